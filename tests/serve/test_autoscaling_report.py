"""What a real vLLM replica reports to the autoscaling policy, through Serve.

Serve's controller asks each replica for `record_autoscaling_stats` every `metrics_interval_s`
and hands the values to the policy (serve_app.serving.autoscaling). Here the replica runs the
real vLLM CPU engine: the requests it reports running and waiting are the ones its clients hold.
Scaling on those figures across (fake) GPU nodes is tested in tests/cluster, the policy's
arithmetic in tests/unit.
"""

from __future__ import annotations

import time

from serve_app.serving.autoscaling import KV_CACHE, RUNNING, WAITING
from tests.serve.conftest import APP_NAME, RunningApp, streams_held

MODEL = "tiny-mistral-v3"
STREAMS = 3


def _report(app: RunningApp) -> dict[str, float]:
    from ray import serve

    model = app.config.find(MODEL)
    assert model is not None
    handle = serve.get_deployment_handle(model.deployment_name, APP_NAME)
    report: dict[str, float] = handle.record_autoscaling_stats.remote().result(timeout_s=30)
    return report


def test_a_vllm_replica_reports_the_requests_its_engine_holds(local_app: RunningApp) -> None:
    idle = _report(local_app)
    assert idle == {RUNNING: 0.0, WAITING: 0.0, KV_CACHE: 0.0}, idle
    with streams_held(local_app.url, MODEL, STREAMS):
        deadline = time.monotonic() + 10
        # The engine's scheduler counts a request once it has taken a step with it.
        while (busy := _report(local_app))[RUNNING] + busy[WAITING] < STREAMS:
            assert time.monotonic() < deadline, busy
            time.sleep(0.1)
    assert busy[RUNNING] + busy[WAITING] == STREAMS, busy
    assert 0.0 < busy[KV_CACHE] <= 1.0, busy
