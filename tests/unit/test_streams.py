"""`coalesce`: chunks that queue while the consumer is busy travel on together, in order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from serve_app.streams import coalesce


class Marker:
    """A non-bytes item (like `Head` or `Usage`): never joined, keeps its place."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Marker({self.name})"


async def _source(items: list[object], gap_s: float = 0.0) -> AsyncIterator[object]:
    for item in items:
        if gap_s:
            await asyncio.sleep(gap_s)
        yield item


def test_a_fast_consumer_gets_each_chunk_as_it_comes() -> None:
    async def main() -> list[object]:
        return [item async for item in coalesce(_source([b"a", b"b", b"c"], gap_s=0.01))]

    assert asyncio.run(main()) == [b"a", b"b", b"c"]


def test_chunks_that_queue_while_the_consumer_is_busy_are_joined() -> None:
    first, second, third = Marker("head"), Marker("mid"), Marker("usage")

    async def main() -> list[object]:
        out = []
        async for item in coalesce(_source([first, b"1", b"2", second, b"3", b"4", b"5", third])):
            out.append(item)
            await asyncio.sleep(0.05)  # a busy consumer: everything else queues meanwhile
        return out

    out = asyncio.run(main())
    # The first item is never held; what queued behind it comes joined, markers in place.
    assert out == [first, b"12", second, b"345", third]


def test_the_first_chunk_is_not_held_back() -> None:
    async def slow_rest() -> AsyncIterator[bytes]:
        yield b"first"
        await asyncio.sleep(10)
        yield b"late"

    async def main() -> float:
        loop = asyncio.get_running_loop()
        started = loop.time()
        stream = coalesce(slow_rest())
        assert await stream.__anext__() == b"first"
        waited = loop.time() - started
        await stream.aclose()
        return waited

    assert asyncio.run(main()) < 1.0


def test_an_error_comes_after_everything_read_before_it() -> None:
    async def broken() -> AsyncIterator[bytes]:
        yield b"x"
        yield b"y"
        raise RuntimeError("replica died")

    async def main() -> list[object]:
        out: list[object] = []
        with pytest.raises(RuntimeError, match="replica died"):
            async for item in coalesce(broken()):
                out.append(item)
                await asyncio.sleep(0.02)
        return out

    out = asyncio.run(main())
    assert all(isinstance(item, bytes) for item in out)
    assert b"".join(item for item in out if isinstance(item, bytes)) == b"xy"


def test_closing_it_cancels_the_source_where_it_waits() -> None:
    async def main() -> bool:
        seen = asyncio.Event()

        async def endless() -> AsyncIterator[bytes]:
            try:
                yield b"one"
                await asyncio.sleep(60)
                yield b"never"
            except asyncio.CancelledError:
                seen.set()
                raise

        async with contextlib.aclosing(coalesce(endless())) as stream:
            async for item in stream:
                assert item == b"one"
                break
        await asyncio.wait_for(seen.wait(), timeout=5)
        return seen.is_set()

    assert asyncio.run(main())
