"""CPU used by each process of a benchmarked server, between two readings."""

from __future__ import annotations

import contextlib
from typing import Any

from serve_app.local.processes import process_label


def cpu_seconds(pids: set[int]) -> dict[int, tuple[str, float]]:
    """Each live process of `pids`: its label and the CPU seconds (user + system) it has used."""
    import psutil

    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            times = proc.cpu_times()
            out[pid] = (process_label(proc), times.user + times.system)
    return out


def children_cpu_s() -> float:
    """CPU seconds used by this process's children that ended and were waited for."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def busiest(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    wall_s: float,
    output_tokens: int,
    top: int = 6,
) -> list[dict[str, Any]]:
    """The processes that used the most CPU between two `cpu_seconds` readings.

    `cores` is the share of one core a process kept busy; `cpu_ms_per_1k_tokens` predicts
    where a faster engine will cap: a process that needs N ms of CPU per thousand tokens
    cannot relay more than 1e6 / N tokens/s on one core, however fast the GPU is.
    """
    used = []
    for pid, (label, seconds) in after.items():
        spent = seconds - before.get(pid, (label, 0.0))[1]
        if spent > 0:
            used.append((spent, label))
    used.sort(reverse=True)
    return [
        {
            "process": label,
            "cpu_s": round(spent, 2),
            "cores": round(spent / wall_s, 2) if wall_s > 0 else None,
            "cpu_ms_per_1k_tokens": round(1e6 * spent / output_tokens, 1) if output_tokens else None,
        }
        for spent, label in used[:top]
    ]
