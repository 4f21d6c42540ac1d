"""`coalesce`: chunks that queue while the consumer is busy travel on together, in order."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections.abc import AsyncIterator

import pytest

from serve_app.serving.streams import coalesce


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


def test_a_minimum_interval_batches_later_chunks_but_not_the_first_ones() -> None:
    # Times are taken from the source's own yields, so a slow machine (sleeps that overrun)
    # changes how many messages there are, not whether the test passes.
    yielded: list[float] = []

    async def tokens() -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        for i in range(20):
            yielded.append(loop.time())
            yield f"t{i},".encode()
            await asyncio.sleep(0.01)
        yielded.append(loop.time())  # the end of the stream

    async def main() -> list[tuple[float, bytes]]:
        loop = asyncio.get_running_loop()
        out = []
        async for item in coalesce(tokens(), min_interval_s=0.06):
            assert isinstance(item, bytes)
            out.append((loop.time(), item))
        return out

    out = asyncio.run(main())
    assert b"".join(item for _, item in out) == b"".join(f"t{i},".encode() for i in range(20))
    # The first two messages (a chat stream's role chunk and first content) go at once:
    # not held for the 60 ms interval.
    assert out[0][1] == b"t0," and out[1][1] == b"t1,"
    assert out[1][0] - yielded[1] < 0.04
    # Then messages are >= 60 ms apart (but the last, sent when the stream ends), so each
    # carries several chunks...
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(out[2:])]
    assert all(gap >= 0.05 for gap in gaps[:-1]), gaps
    assert len(out) <= 2 + math.ceil((yielded[-1] - out[1][0]) / 0.06) + 1, (
        len(out),
        yielded[-1] - out[1][0],
    )
    # ...and the end of the stream is not held back for a full interval.
    assert out[-1][0] - yielded[-1] < 0.06, out[-1][0] - yielded[-1]


def test_no_interval_holds_nothing() -> None:
    async def tokens() -> AsyncIterator[bytes]:
        for i in range(5):
            yield f"t{i}".encode()
            await asyncio.sleep(0.02)

    async def main() -> int:
        return len([item async for item in coalesce(tokens())])

    assert asyncio.run(main()) == 5
