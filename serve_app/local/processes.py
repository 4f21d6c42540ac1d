"""Process bookkeeping, so that stopping the app leaves no Ray, replica or engine process."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from pathlib import Path

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


_RAY_METHOD = re.compile(r"\.[a-z_][a-z0-9_]*$")
# Ray's own daemons, which run as plain programs (their command line names their script).
_RAY_DAEMONS = ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env", "monitor.py")


def process_label(proc: psutil.Process) -> str:
    """A short, stable name for one of the app's processes, for CPU and memory reports: Ray's
    title for its workers (`ServeReplica:app:Deployment`, `ProxyActor`), vLLM's for its engine
    (`VLLM::EngineCore`), Ray's daemons by name, else the program (and module)."""
    try:
        cmdline = proc.cmdline()
    except psutil.Error:
        return "?"
    return label_of(cmdline)


def label_of(cmdline: Sequence[str]) -> str:
    """`process_label` of a command line."""
    if not cmdline:
        return "?"
    title = cmdline[0].split(" ")[0]
    if title.startswith("ray::"):
        # Ray adds the method an actor is running (`ProxyActor.receive_asgi_messages`): drop it,
        # so that one process keeps one name.
        return _RAY_METHOD.sub("", title[len("ray::") :])
    if "::" in title:
        return title
    for daemon in _RAY_DAEMONS:
        if any(daemon in part for part in cmdline[:3]):
            return daemon
    program = Path(title).name
    if "-m" in cmdline[:-1]:
        return f"{program} -m {cmdline[cmdline.index('-m') + 1]}"
    return program
