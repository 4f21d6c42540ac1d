"""Process bookkeeping, so that stopping the app leaves no Ray, replica or engine process."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

import psutil


def descendants() -> set[int]:
    """Pids of every process below this one (Ray's raylet, workers, vLLM engine cores...)."""
    try:
        return {p.pid for p in psutil.Process().children(recursive=True)}
    except psutil.Error:
        return set()


def kill_leftovers(pids: set[int], grace_s: float = 5.0) -> int:
    """Terminate those of `pids` still running (then kill them); return how many there were.

    Engine processes are grandchildren of Ray's workers: if a worker dies first they are
    re-parented and no longer below us, so callers collect pids while the app runs.
    """
    alive = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, still = psutil.wait_procs(alive, timeout=grace_s)
    for proc in still:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return len(alive)


def stop_local_ray(owned: set[int], keep: frozenset[int] = frozenset()) -> int:
    """Shut Serve and this process's Ray down, then kill whatever of `owned` (and of our
    descendants now, but `keep`) outlived them; return how many had to be killed."""
    import ray
    from ray import serve

    owned = (owned | descendants()) - keep
    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()
        left = kill_leftovers(owned)
    return left


def start_reaper() -> subprocess.Popen[bytes]:
    """Start a sidecar that kills this process's descendants if this process dies first.

    vLLM runs its engine core in child processes. A replica that stops normally stops them;
    one that is killed (`ray.kill`, the OOM killer) would leave them running and holding
    their accelerator memory. The sidecar runs in its own session, so it outlives us.
    """
    return subprocess.Popen(
        [sys.executable, "-m", "serve_app.processes", str(os.getpid())],
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
