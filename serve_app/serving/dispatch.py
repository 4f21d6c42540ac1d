"""Sending one request to its model's replicas, and waiting for the answer to begin.

A request waits (not failed) while the model has no free replica, e.g. while it scales up
from zero, for at most the model's `request_wait_timeout_s`. A full router queue sheds it at
once. A replica whose model could not wake (serve_app.serving.warm) fails the request at once.
A replica that fails before it took the request (its first item) is tried once more, on
another replica: the request never reached an engine. One that fails after taking it is not:
the request may be what killed its engine, and would kill the next one too. Each refusal is a
503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentResponseGenerator

from serve_app.engine.protocol import Head, Route
from serve_app.errors import ApiError
from serve_app.serving.adapters import AdapterSpec
from serve_app.serving.catalog import ServedModel, shown
from serve_app.serving.routing import AFFINITY_KWARG, Affinity
from serve_app.serving.telemetry import RequestRecord
from serve_app.serving.warm import WakeFailed

logger = logging.getLogger("ray.serve")

RETRY_AFTER_S = 10
ATTEMPTS = 2


def _retry_later(message: str) -> ApiError:
    return ApiError(503, message, headers={"Retry-After": str(RETRY_AFTER_S)})


def _wake_failure(exc: BaseException) -> WakeFailed | None:
    """The `WakeFailed` a replica raised, as Ray delivers it (wrapped in a RayTaskError)."""
    for candidate in (exc, getattr(exc, "cause", None)):
        if isinstance(candidate, WakeFailed) and candidate.args:
            return candidate
    return None


async def dispatch(
    model: ServedModel,
    name: str,
    route: Route,
    body: bytes,
    record: RequestRecord,
    affinity: Affinity | None = None,
    adapter: AdapterSpec | None = None,
    batch: bool = False,
) -> tuple[Head, DeploymentResponseGenerator]:
    """Send the request to a replica of `model` (asked for as `name`); its response's `Head`
    and the stream it comes on (the rest follows on the stream if `head.stream`). `affinity`
    is what routes it (serve_app.serving.routing); a retry goes without it, to any replica.
    `adapter`: the LoRA adapter the request names, which routes it to replicas holding it
    (and which a retry keeps: the replica needs it). `batch`: a request of a batch, which the
    replica lets interactive requests go ahead of (serve_app.serving.lanes)."""
    request_id = record.request_id
    name = shown(name)
    deadline = time.monotonic() + model.card.wait_timeout_s
    for attempt in range(1, ATTEMPTS + 1):
        keyed: dict[str, Any] = {AFFINITY_KWARG: affinity} if affinity is not None and attempt == 1 else {}
        if adapter is not None:
            keyed["adapter"] = adapter
        if batch:
            keyed["batch"] = True
        stream = model.stream_for(adapter).remote(route, body, request_id, **keyed)
        taken = False
        try:
            # The replica's first item says it took the request: only that wait is bounded.
            await asyncio.wait_for(stream.__anext__(), timeout=max(0.0, deadline - time.monotonic()))
            record.accepted, taken = time.perf_counter(), True
            head = await stream.__anext__()
        except asyncio.TimeoutError:
            stream.cancel()
            logger.warning("request %s: no replica of %s took it in time", request_id, name)
            raise _retry_later(
                f"The model `{name}` has no replica ready to serve the request; retry later."
            ) from None
        except BackPressureError:
            # The model's router queue is full (deployment.max_queued_requests): shed load.
            record.error = "backpressure"
            raise _retry_later(f"The model `{name}` is at capacity; retry later.") from None
        except asyncio.CancelledError:
            stream.cancel()  # the client went away: free the engine
            raise
        except Exception as exc:
            # The replica or its engine failed before the first byte: nothing reached the client.
            stream.cancel()
            record.error = repr(exc)
            if (failed := _wake_failure(exc)) is not None:
                # Every request that waited for this wake fails with it; a retry would wait again.
                logger.warning("request %s: model %s could not wake: %s", request_id, name, failed.args[0])
                raise _retry_later(
                    f"The model `{name}` could not wake: {failed.args[0]}; retry later."
                ) from None
            if attempt < ATTEMPTS and not taken:
                logger.warning(
                    "request %s: model %s failed before responding (%r); retrying", request_id, name, exc
                )
                continue
            logger.warning("request %s: model %s failed before responding: %r", request_id, name, exc)
            raise _retry_later(f"The model `{name}` could not serve the request; retry later.") from None
        if not isinstance(head, Head):
            raise TypeError(f"a model replica answered {type(head).__name__} where a Head was due")
        return head, stream
    raise AssertionError("unreachable")
