"""Relaying a model's SSE stream to the client, and recording the request when it ends."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from fastapi.responses import StreamingResponse
from ray.exceptions import TaskCancelledError
from ray.serve.handle import DeploymentResponseGenerator
from starlette.types import Receive, Scope, Send

from serve_app.engine.protocol import Usage
from serve_app.errors import error_body
from serve_app.serving.streams import coalesce
from serve_app.serving.telemetry import RequestRecord

logger = logging.getLogger("ray.serve")

DONE = b"data: [DONE]\n\n"


class RelayedStream(StreamingResponse):
    """An SSE response relayed from a model replica, recorded when it ends.

    However the response ends (sent whole, broken, or the client gone before or during
    the body), the engine request is released and the request is recorded once.
    """

    def __init__(
        self,
        stream: DeploymentResponseGenerator,
        record: RequestRecord,
        on_finish: Callable[[RequestRecord], None],
    ) -> None:
        super().__init__(relay(stream, record), media_type="text/event-stream")
        self._stream = stream
        self._record = record
        self._on_finish = on_finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except TaskCancelledError:
            # Serve reports a client that left as a cancelled task from `receive()`: that is
            # the end of this response (recorded as cancelled below), not an error.
            pass
        finally:
            if not self._record.done:
                self._record.cancelled = True
                self._stream.cancel()
            self._on_finish(self._record)


async def relay(stream: DeploymentResponseGenerator, record: RequestRecord) -> AsyncIterator[bytes]:
    """Pass SSE chunks on as they come, keeping the engine's token counts for the record.

    Chunks that queue while this replica is busy go on together (`coalesce`): the HTTP side
    then sends fewer, larger messages, and the first chunk is never held back.
    """
    finished = False
    try:
        async with contextlib.aclosing(coalesce(stream)) as items:
            async for item in items:
                if isinstance(item, Usage):
                    record.usage = item
                    continue
                record.chunk(item)
                finished = item.endswith(DONE)
                yield item
    except Exception as exc:  # the replica died mid-stream: end the way OpenAI clients understand
        logger.warning("request %s: stream broke: %r", record.request_id, exc)
        record.status, record.error = 503, f"stream interrupted: {exc!r}"
        yield b"data: " + error_body(503, "The stream was interrupted by a server error.") + b"\n\n"
        yield DONE
        finished = True
    # A stream cut short (Serve cancels the model's stream when the client leaves) ends
    # without [DONE]: it stays not done, so it is recorded as cancelled.
    record.done = finished
