"""A sidecar that kills a process's descendants once that process is gone.

vLLM runs its engine core in child processes. A model replica that stops normally stops them;
one that is killed (`ray.kill`, the OOM killer) would leave them running and holding their
accelerator memory. Each replica (and `serve_app run`, for what Ray's workers start) runs
this sidecar in its own session, so that it outlives its parent:

    python -m serve_app.serving.reaper PARENT_PID
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import psutil


def start_reaper() -> subprocess.Popen[bytes]:
    """Start a sidecar that kills this process's descendants if this process dies first."""
    return subprocess.Popen(
        [sys.executable, "-m", __name__, str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )


def reap_after(parent_pid: int, period_s: float = 1.0) -> int:
    """While `parent_pid` lives, note its descendants; once it is gone, kill those still
    running (matched by pid and start time, never a reused pid). Returns how many."""
    me = os.getpid()
    known: dict[int, float] = {}
    try:
        parent = psutil.Process(parent_pid)
        while parent.is_running() and parent.status() != psutil.STATUS_ZOMBIE:
            with contextlib.suppress(psutil.Error):
                for child in parent.children(recursive=True):
                    if child.pid != me:
                        known.setdefault(child.pid, child.create_time())
            time.sleep(period_s)
    except psutil.NoSuchProcess:
        pass
    leftovers = []
    for pid, started in known.items():
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.create_time() == started:
                leftovers.append(proc)
    for proc in leftovers:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return len(leftovers)


if __name__ == "__main__":
    reap_after(int(sys.argv[1]))
