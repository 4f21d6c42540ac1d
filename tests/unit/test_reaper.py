"""The reaper sidecar kills a replica's engine processes when the replica is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

from tests.conftest import ROOT

# A stand-in replica: starts the reaper, then a long-lived "engine" child, prints both pids.
PARENT = textwrap.dedent(
    """
    import subprocess, sys, time
    from serve_app.serving.reaper import start_reaper
    reaper = start_reaper()
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    print(reaper.pid, engine.pid, flush=True)
    time.sleep(300)
    """
)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_killed_parent_leaves_no_engine_process() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ}
    )
    assert parent.stdout is not None
    reaper_pid, engine_pid = map(int, parent.stdout.readline().split())
    try:
        time.sleep(4.0)  # the reaper (a fresh interpreter, scanning each second) has seen the engine
        assert not _gone(engine_pid)
        parent.send_signal(signal.SIGKILL)  # as ray.kill does to a replica
        parent.wait()
        deadline = time.monotonic() + 10
        while not (_gone(engine_pid) and _gone(reaper_pid)):
            assert time.monotonic() < deadline, "the engine process outlived its killed parent"
            time.sleep(0.1)
    finally:
        for pid in (engine_pid, reaper_pid):
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
