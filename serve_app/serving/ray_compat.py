"""Ray Serve internals mistral-serve leans on, where Serve has no public API. Targets Ray
2.60.0 (tested there); each says what it stands for, so that a release that moves it fails
its test (tests/cluster/test_adapters.py, tests/serve/test_batches.py) rather than routing
silently worse.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

logger = logging.getLogger("ray.serve")
T = TypeVar("T")


def report_multiplexed_ids(model_ids: Sequence[str]) -> bool:
    """Tell Serve's controller which multiplexed model ids this replica holds, as
    `serve.multiplexed`'s wrapper does (`_ModelMultiplexWrapper._push_model_ids_info`); the
    controller passes them on to every router (`RunningReplica.multiplexed_model_ids`).

    Serve's own wrapper cannot serve here: it evicts an adapter that requests still use, and it
    runs only inside a replica. False outside a Serve replica. Blocking (the first call looks up
    the controller): call it off the event loop."""
    from ray.serve._private.common import RequestRoutingInfo
    from ray.serve.context import _get_global_client, _get_internal_replica_context

    context = _get_internal_replica_context()
    if context is None:
        return False
    info = RequestRoutingInfo(replica_id=context.replica_id, multiplexed_model_ids=list(model_ids))
    _get_global_client().record_request_routing_info(info)
    return True


def in_own_request(coro: Coroutine[Any, Any, T], request_id: str) -> asyncio.Task[T]:
    """Run `coro` as a task whose Serve handle calls each start a request of their own (logged
    under `request_id`), not a part of the request that the code creating the task serves.

    Serve keeps a replica's request context in a contextvar
    (`ray.serve.context._serve_request_context`): a task created while serving a request copies
    it, and every handle call it makes carries that request's internal id. Calls made under one
    id by a background task (a batch's requests, sent long after the call that started the
    batch) confuse the router of the replica they reach, which keys its pending requests by it
    (seen on Ray 2.60: an ingress replica's router spinning, its event loop taken), and the
    first request's end or cancellation would reach them. With a context that names only a
    request id, Serve makes a new internal id for each call."""
    from ray.serve.context import _RequestContext, _serve_request_context

    context = contextvars.copy_context()
    context.run(_serve_request_context.set, _RequestContext(request_id=request_id))
    return context.run(asyncio.ensure_future, coro)
