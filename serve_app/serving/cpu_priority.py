"""Batch work at the OS's idle CPU priority (`batches.idle_cpu_priority`).

Where models share a machine's cores (the CPU build of vLLM), a batch request that computes on
one engine takes cores from an interactive request's whole path on another: the HTTP front, the
ingress, the other model's replica and engine. Cancelling the batch request when the
interactive one arrives comes too late: the arrival already shares the cores, and pays for the
cancellation too.

So a model replica runs its engine's processes (vLLM's engine core and the workers below it)
under Linux's `SCHED_IDLE` policy while it has no interactive request in flight (batch requests
only, or none), and under the normal policy from an interactive request's arrival to its end,
and during a health check. A thread under `SCHED_IDLE` runs only on cores that nothing else
wants: the batch keeps every cycle the interactive path leaves, and loses no work. An idle
engine whose workers poll for work (vLLM's CPU workers do) stops taking cores from the rest too.
What it cannot help is an interactive request that shares its engine's steps with a batch
request in flight on that same engine.

Any process may put its own children under `SCHED_IDLE`, but taking them out again needs root,
`CAP_SYS_NICE` (Kubernetes: the container's `securityContext.capabilities.add: [SYS_NICE]`), or
an `RLIMIT_NICE` of 20 (`ulimit -e 20`; Docker: `--ulimit nice=20`). A replica first checks on a
thread of its own that it could, and otherwise leaves the engine as it is, saying so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Iterable

import psutil

logger = logging.getLogger("ray.serve")

SUPPORTED = hasattr(os, "SCHED_IDLE") and hasattr(os, "sched_setscheduler")


def thread_ids(pid: int) -> list[int]:
    """The ids of a process's threads (Linux); empty if it is gone."""
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return []


def with_descendants(pids: Iterable[int]) -> list[int]:
    """`pids` and every process below them (vLLM's engine core computes in worker processes of
    its own); those already gone are left out."""
    found: list[int] = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            found += [pid, *(child.pid for child in proc.children(recursive=True))]
        except psutil.Error:
            continue
    return found


def set_policy(pids: list[int], idle: bool) -> None:
    """Every thread of `pids` under `SCHED_IDLE` (`idle`) or `SCHED_OTHER`. A thread that ends
    meanwhile is skipped; PermissionError is raised (the processes are not this user's)."""
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    param = os.sched_param(0)
    for pid in pids:
        for tid in thread_ids(pid):
            with contextlib.suppress(ProcessLookupError):  # the thread ended meanwhile
                os.sched_setscheduler(tid, policy, param)


def can_leave_idle() -> bool:
    """Whether this process may take a thread out of `SCHED_IDLE` again: tried on a thread of
    its own, which ends either way."""
    answer: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=probe, name="cpu-priority-probe")
    thread.start()
    thread.join()
    return answer == [True]


class CpuPriority:
    """Counts a replica's interactive requests in flight; its engine's processes run at idle
    CPU priority while there are none."""

    def __init__(self, model: str, pids: Iterable[int], enabled: bool = True) -> None:
        """`pids`: the engine's processes; those below them count too (their threads are read at
        each switch; an engine lives as long as its replica, so its processes stay the same)."""
        self._model = model
        self._enabled = enabled and SUPPORTED and can_leave_idle()
        self._pids = with_descendants(pids) if self._enabled else []
        self._interactive = 0
        if enabled and not self._enabled:
            logger.warning(
                "model %s: batches.idle_cpu_priority is off here: it needs Linux, and root, "
                "CAP_SYS_NICE or an RLIMIT_NICE of 20 to take the engine out of SCHED_IDLE again",
                model,
            )
        self._switch(idle=True)

    @property
    def interactive(self) -> int:
        return self._interactive

    def begin(self) -> Callable[[], None]:
        """Count an interactive request from now; the returned function ends it (call once)."""
        self._interactive += 1
        if self._interactive == 1:
            self._switch(idle=False)
        ended = False

        def end() -> None:
            nonlocal ended
            if not ended:
                ended = True
                self._interactive -= 1
                if self._interactive == 0:
                    self._switch(idle=True)

        return end

    @property
    def enabled(self) -> bool:
        return self._enabled

    def _switch(self, idle: bool) -> None:
        if not self._enabled:
            return
        try:
            set_policy(self._pids, idle)
        except PermissionError as exc:  # processes not this user's: put them back, say so once
            self._enabled = False
            logger.warning(
                "model %s: cannot set the engine's CPU priority (%s); left as it is", self._model, exc
            )
            with contextlib.suppress(PermissionError):
                set_policy(self._pids, idle=False)
