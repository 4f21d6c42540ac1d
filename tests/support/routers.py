"""Serve request routers built outside Serve, for unit tests of their choices."""

from __future__ import annotations

from ray.serve._private.common import DeploymentHandleSource, DeploymentID

from serve_app.serving.routing import AffinityRouter


def affinity_router(deployment: DeploymentID) -> AffinityRouter:
    """An `AffinityRouter` of `deployment`, with its queue-length cache and default state."""
    router = AffinityRouter(
        deployment_id=deployment,
        handle_source=DeploymentHandleSource.UNKNOWN,
        use_replica_queue_len_cache=True,
    )
    router.initialize_state()
    return router
