"""Ray Serve internals mistral-serve leans on, where Serve has no public API. Targets Ray
2.60.0 (tested there); each says what it stands for, so that a release that moves it fails
its test (tests/cluster/test_adapters.py) rather than routing silently worse.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger("ray.serve")


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
