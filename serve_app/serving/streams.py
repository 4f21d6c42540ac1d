"""Coalescing a stream of SSE bytes while its consumer is busy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import TypeVar

T = TypeVar("T")

# Messages sent before any holding starts: a chat stream's role chunk and its first content.
UNHELD_MESSAGES = 2


async def coalesce(source: AsyncIterator[T], min_interval_s: float = 0.0) -> AsyncGenerator[T | bytes, None]:
    """Yield `source`'s items, joining the `bytes` items that queued while the consumer was busy.

    A task reads `source` ahead into a buffer; each time the consumer asks for more, it gets
    everything buffered. Under light load that is each item as it arrives (the first is
    never held back); when the process is busy, the chunks that came meanwhile go on as one
    piece, so every hop after this one carries fewer, larger messages. Items that are not
    `bytes` keep their place and are never joined. An exception from `source` is raised
    after everything read before it. Closing this generator cancels the read-ahead, which
    cancels `source` where it waits.

    With `min_interval_s`, bytes messages after the first `UNHELD_MESSAGES` are at least that
    far apart: chunks wait for company, up to that long, unless the stream ends first. This
    trades smoothness for fewer messages (Ray Serve LLM's `stream_batching_interval_ms`).
    """
    loop = asyncio.get_running_loop()
    buffer: list[T] = []
    waiter: asyncio.Future[None] | None = None
    holding = ended = False
    failure: BaseException | None = None

    def wake() -> None:
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read_ahead() -> None:
        nonlocal ended, failure
        try:
            async for item in source:
                buffer.append(item)
                if not holding:
                    wake()
        except Exception as exc:
            failure = exc
        finally:
            ended = True
            wake()

    reader = loop.create_task(read_ahead())
    sent = 0
    last_sent = 0.0
    try:
        while True:
            if not buffer:
                if ended:
                    break
                waiter = loop.create_future()
                await waiter
                waiter = None
                continue
            if min_interval_s > 0 and sent >= UNHELD_MESSAGES and not ended:
                hold = last_sent + min_interval_s - loop.time()
                if hold > 0:
                    waiter, holding = loop.create_future(), True
                    timer = loop.call_later(hold, wake)
                    try:
                        await waiter
                    finally:
                        timer.cancel()
                        waiter, holding = None, False
            items = buffer.copy()
            buffer.clear()
            for item in _joined(items):
                yield item
                if min_interval_s > 0 and isinstance(item, bytes):
                    sent += 1
                    last_sent = loop.time()
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
