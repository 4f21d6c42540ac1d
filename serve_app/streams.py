"""Coalescing a stream of SSE bytes while its consumer is busy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import TypeVar

T = TypeVar("T")


async def coalesce(source: AsyncIterator[T]) -> AsyncGenerator[T | bytes, None]:
    """Yield `source`'s items, joining the `bytes` items that queued while the consumer was busy.

    A task reads `source` ahead into a buffer; each time the consumer asks for more, it gets
    everything buffered. Under light load that is each item as it arrives (the first is
    never held back); when the process is busy, the chunks that came meanwhile go on as one
    piece, so every hop after this one carries fewer, larger messages. Items that are not
    `bytes` keep their place and are never joined. An exception from `source` is raised
    after everything read before it. Closing this generator cancels the read-ahead, which
    cancels `source` where it waits.
    """
    buffer: list[T] = []
    ready = asyncio.Event()
    ended = False
    failure: BaseException | None = None

    async def read_ahead() -> None:
        nonlocal ended, failure
        try:
            async for item in source:
                buffer.append(item)
                ready.set()
        except Exception as exc:
            failure = exc
        finally:
            ended = True
            ready.set()

    reader = asyncio.create_task(read_ahead())
    try:
        while True:
            if not buffer:
                if ended:
                    break
                await ready.wait()
                ready.clear()
                continue
            items = buffer.copy()
            buffer.clear()
            for item in _joined(items):
                yield item
        if failure is not None:
            raise failure
    finally:
        if not reader.done():
            reader.cancel()


def _joined(items: list[T]) -> Iterator[T | bytes]:
    """`items` with each run of consecutive `bytes` joined into one."""
    run: list[bytes] = []
    for item in items:
        if isinstance(item, bytes):
            run.append(item)
            continue
        if run:
            yield run[0] if len(run) == 1 else b"".join(run)
            run = []
        yield item
    if run:
        yield run[0] if len(run) == 1 else b"".join(run)
