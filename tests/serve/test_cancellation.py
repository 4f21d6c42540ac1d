"""Clients that leave free their engine requests, streaming or not.

The release time is printed as a figure (about 0.1 s here). The bound asserted is wide enough
for a loaded machine, and far below the tens of seconds the 3000-token requests would take to
finish by themselves, so a request the engine kept still fails the test.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.serve.conftest import RunningApp, long_chat, streams_held

MODEL = "tiny-mistral-v3"
STREAMS = 24
RELEASED_WITHIN_S = 5.0


def _drained_within(app: RunningApp, timeout_s: float) -> float:
    """Seconds until the engine holds no request (running, waiting or in flight)."""
    start = time.monotonic()
    while True:
        load = app.engine_load(MODEL)
        elapsed = time.monotonic() - start
        if load.in_flight == 0 and load.running == 0 and load.waiting == 0:
            return elapsed
        assert elapsed < timeout_s, f"the engine still holds {load} after {elapsed:.2f} s"
        time.sleep(0.02)


def test_many_streams_left_at_once_free_the_engine(local_app: RunningApp) -> None:
    assert local_app.engine_stats(MODEL) == 0
    with streams_held(local_app.url, MODEL, STREAMS):
        held = local_app.engine_load(MODEL)
        assert held.in_flight == STREAMS, held
    took = _drained_within(local_app, RELEASED_WITHIN_S)
    print(f"\n{STREAMS} streams left at once: engine empty {took * 1000:.0f} ms after the last close")


def test_non_streaming_clients_that_leave_free_the_engine(local_app: RunningApp) -> None:
    assert local_app.engine_stats(MODEL) == 0
    with ThreadPoolExecutor(8) as pool:
        # A client that stops waiting after 4 s (time for all 8 to reach the engine on a busy
        # machine): httpx closes the connection on the timeout.
        def ask(_: int) -> None:
            try:
                httpx.post(
                    f"{local_app.url}/v1/chat/completions", json=long_chat(MODEL, stream=False), timeout=4.0
                )
            except httpx.TimeoutException:
                return
            raise AssertionError("the request finished before the client left")

        futures = [pool.submit(ask, i) for i in range(8)]
        deadline = time.monotonic() + 30
        while local_app.engine_stats(MODEL) < 8:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for f in futures:
            f.result()
    took = _drained_within(local_app, RELEASED_WITHIN_S)
    print(f"\n8 non-streaming clients left: engine empty {took * 1000:.0f} ms after the last timeout")
