"""Process bookkeeping, so that stopping the app leaves no Ray, replica or engine process."""

from __future__ import annotations

import contextlib

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
