"""The benchmark's figures: per-level summaries, the ours/plain-vLLM comparison, the table and
the plot.

A target's levels are one list in the order they ran; since a run may cover several prompt
modes, each level's record names its mode (`prompts`), and everything here groups by mode
first, then concurrency. Reports written before modes were a list have no `prompts` in their
levels (one mode, `conditions.prompts` a string): they group as one mode, `None`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from serve_app.tools.load import Result


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), interpolated linearly between ranks; None if no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def ms(seconds: float | None) -> float | None:
    """Seconds as milliseconds, to 0.01 ms; None stays None."""
    return None if seconds is None else round(seconds * 1000, 2)


def summarize(results: Sequence[Result], wall_s: float, concurrency: int) -> dict[str, Any]:
    """Figures of one level. Throughput counts the completion tokens of successful requests."""
    ok = [r for r in results if r.error is None]
    errors = Counter(r.error for r in results if r.error is not None)
    tokens = sum(r.completion_tokens or 0 for r in ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [gap for r in ok for gap in r.itl_s]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(5)),
        "wall_s": round(wall_s, 3),
        "output_tokens": tokens,
        "output_tok_s": round(tokens / wall_s, 2) if wall_s > 0 else 0.0,
        "requests_s": round(len(ok) / wall_s, 3) if wall_s > 0 else 0.0,
        "ttft_p50_ms": ms(percentile(ttft, 50)),
        "ttft_p95_ms": ms(percentile(ttft, 95)),
        "itl_p50_ms": ms(percentile(itl, 50)),
        "itl_p99_ms": ms(percentile(itl, 99)),
        "prompt_tokens": sorted({r.prompt_tokens for r in ok if r.prompt_tokens is not None}),
    }


Levels = dict[str, list[dict[str, Any]]]  # target -> its levels, in the order they ran


def modes(levels: Levels) -> list[str | None]:
    """The prompt modes of `levels`, in the order they first ran (None: a level without one)."""
    seen: dict[str | None, None] = {}
    for target_levels in levels.values():
        for lv in target_levels:
            seen.setdefault(lv.get("prompts"))
    return list(seen)


def of_mode(levels: Levels, mode: str | None) -> Levels:
    """`levels` with only those of prompt `mode`; targets that ran none of it left out."""
    kept = {t: [lv for lv in lvs if lv.get("prompts") == mode] for t, lvs in levels.items()}
    return {t: lvs for t, lvs in kept.items() if lvs}


def counted_prompt_tokens(levels: Levels) -> dict[str, list[int]]:
    """Per prompt mode, the prompt token counts the servers reported (usage), over all targets."""
    return {
        str(mode): sorted(
            {n for lvs in of_mode(levels, mode).values() for lv in lvs for n in lv["prompt_tokens"]}
        )
        for mode in modes(levels)
    }


def compare(levels: Levels, baseline: str = "vllm") -> list[dict[str, Any]]:
    """Per prompt mode and concurrency run by both targets: ours/baseline output tok/s, ours -
    baseline TTFT p50 (ms). A row names its mode (`prompts`) where the levels do."""
    rows = []
    for mode in modes(levels):
        rows += [
            {**({"prompts": mode} if mode is not None else {}), **row}
            for row in _compare_one(of_mode(levels, mode), baseline)
        ]
    return rows


def _compare_one(levels: Levels, baseline: str) -> list[dict[str, Any]]:
    base = {lv["concurrency"]: lv for lv in levels.get(baseline, [])}
    ours = {lv["concurrency"]: lv for lv in levels.get("ours", [])}
    rows = []
    for c in sorted(set(base) & set(ours)):
        b, o = base[c], ours[c]
        ratio = o["output_tok_s"] / b["output_tok_s"] if b["output_tok_s"] else None
        diff = (
            o["ttft_p50_ms"] - b["ttft_p50_ms"]
            if o["ttft_p50_ms"] is not None and b["ttft_p50_ms"] is not None
            else None
        )
        rows.append(
            {
                "concurrency": c,
                "output_tok_s_ratio": None if ratio is None else round(ratio, 3),
                "ttft_p50_diff_ms": None if diff is None else round(diff, 2),
            }
        )
    return rows


def cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


BASELINES = ("vllm", "vllm-cached", "vllm-multi")


def format_table(levels: Levels, labels: dict[str, str] | None = None) -> str:
    """The result table (times in ms), then ours against each plain vLLM target that ran.
    `labels` name targets in the table (`vllm-multi N=2`); default: their names. Where the
    levels cover several prompt modes, rows go mode by mode and a first column names the mode
    (`prompts`), in the comparisons too; with one mode the table has no such column."""
    labels = labels or {}
    kinds = modes(levels)
    by_mode = len(kinds) > 1
    left = 2 if by_mode else 1  # columns aligned left: the mode's, the target's

    def lead(mode: str | None) -> tuple[str, ...]:
        return (str(mode),) if by_mode else ()

    head = (
        "target",
        "conc",
        "reqs",
        "errs",
        "out tok/s",
        "req/s",
        "TTFT p50",
        "TTFT p95",
        "ITL p50",
        "ITL p99",
    )
    rows = [(*lead("prompts"), *head)]
    for mode in kinds:
        for target, target_levels in of_mode(levels, mode).items():
            rows += [(*lead(mode), *_cells(labels.get(target, target), lv)) for lv in target_levels]
    lines = [_row(rows, r, left) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    for baseline in BASELINES:
        comparison = compare(levels, baseline)
        if not comparison:
            continue
        name = labels.get(baseline, baseline)
        chead = ("conc", f"tok/s ours/{name}", f"TTFT p50 ours-{name} (ms)")
        crows = [(*lead("prompts"), *chead)]
        for row in comparison:
            ratio, diff = row["output_tok_s_ratio"], row["ttft_p50_diff_ms"]
            crows.append(
                (
                    *lead(row.get("prompts")),
                    str(row["concurrency"]),
                    "-" if ratio is None else f"{ratio:.3f}",
                    "-" if diff is None else f"{diff:+.1f}",
                )
            )
        lines += ["", *(_row(crows, r, left) for r in crows)]
    return "\n".join(lines) + "\n(latencies in ms)"


def _cells(label: str, lv: dict[str, Any]) -> tuple[str, ...]:
    return (
        label,
        str(lv["concurrency"]),
        str(lv["requests"]),
        str(lv["errors"]),
        cell(lv["output_tok_s"]),
        cell(lv["requests_s"], 2),
        cell(lv["ttft_p50_ms"]),
        cell(lv["ttft_p95_ms"]),
        cell(lv["itl_p50_ms"]),
        cell(lv["itl_p99_ms"]),
    )


def cpu_line(cpu: Sequence[dict[str, Any]]) -> str:
    return ", ".join(
        f"{p['process']} {p['cores']:.2f} cores ({cell(p['cpu_ms_per_1k_tokens'])} ms/1k tok)" for p in cpu
    )


def _row(rows: Sequence[Sequence[str]], row: Sequence[str], left: int = 1) -> str:
    """`row` in columns as wide as `rows` need: the first `left` aligned left, the rest right."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(row))]
    return "  ".join(
        cell.ljust(w) if i < left else cell.rjust(w)
        for i, (cell, w) in enumerate(zip(row, widths, strict=True))
    )


def plot(levels: Levels, title: str, out: Path, labels: dict[str, str] | None = None) -> None:
    """Output tok/s and TTFT p50 against concurrency, one line per target, ratios annotated:
    one row of these two panels per prompt mode (one row for a single mode)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = modes(levels)
    fig, axes = plt.subplots(len(kinds), 2, figsize=(11, 4.5 * len(kinds)), squeeze=False)
    for (ax_tok, ax_ttft), mode in zip(axes, kinds, strict=True):
        _plot_mode(ax_tok, ax_ttft, of_mode(levels, mode), labels or {})
        what = "" if len(kinds) == 1 else f", {mode} prompts"
        ax_tok.set_title(f"throughput{what} (label: ours / vllm)", fontsize=10)
        ax_ttft.set_title(f"time to first token{what} (label: ours - vllm)", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _plot_mode(ax_tok: Any, ax_ttft: Any, levels: Levels, labels: dict[str, str]) -> None:
    """The two panels of one prompt mode's levels."""
    concurrencies: set[int] = set()
    for target, target_levels in levels.items():
        xs = [lv["concurrency"] for lv in target_levels]
        concurrencies |= set(xs)
        label = labels.get(target, target)
        ax_tok.plot(xs, [lv["output_tok_s"] for lv in target_levels], marker="o", label=label)
        ttft = [
            (lv["concurrency"], lv["ttft_p50_ms"]) for lv in target_levels if lv["ttft_p50_ms"] is not None
        ]
        ax_ttft.plot([c for c, _ in ttft], [t for _, t in ttft], marker="o", label=label)
    ours = {lv["concurrency"]: lv for lv in levels.get("ours", [])}
    for row in compare(levels):
        lv = ours[row["concurrency"]]
        if row["output_tok_s_ratio"] is not None:
            ax_tok.annotate(
                f"x{row['output_tok_s_ratio']:.2f}",
                (row["concurrency"], lv["output_tok_s"]),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                fontsize=8,
            )
        if row["ttft_p50_diff_ms"] is not None and lv["ttft_p50_ms"] is not None:
            ax_ttft.annotate(
                f"{row['ttft_p50_diff_ms']:+.0f} ms",
                (row["concurrency"], lv["ttft_p50_ms"]),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                fontsize=8,
            )
    ticks = sorted(concurrencies)
    for ax, label in ((ax_tok, "output tokens/s"), (ax_ttft, "TTFT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()


def prompts_title(cond: dict[str, Any]) -> str:
    """`124 prompt (repeated)`, or one such part per mode: the prompt side of a plot's title.
    Reads both report forms: `prompts` a string and `prompt_tokens_counted` a list (one mode,
    before modes were a list), or a list of modes and counts per mode."""
    prompts = cond.get("prompts") or ["repeated"]
    kinds = [prompts] if isinstance(prompts, str) else list(prompts)
    counted = cond.get("prompt_tokens_counted") or {}
    if not isinstance(counted, dict):
        counted = {kinds[0]: counted}
    return ", ".join(f"{'/'.join(map(str, counted.get(m) or [])) or '?'} prompt ({m})" for m in kinds)


def plot_report(report: dict[str, Any], out: Path) -> None:
    """The plot of a report as `run_bench` writes it (one row of panels per prompt mode)."""
    cond = report["conditions"]
    levels = {target: r["levels"] for target, r in report["results"].items()}
    labels = {target: r.get("label", target) for target, r in report["results"].items()}
    machine = cond.get("machine", {})
    gpu = f", {machine['gpus'][0]}" if machine.get("gpus") else ""
    title = (
        f"{cond['model']}: {prompts_title(cond)} / {cond['output_tokens']} output tokens; "
        f"{machine.get('cpu', '?')} x{machine.get('cores', '?')}{gpu}"
    )
    plot(levels, title, out, labels)


def save_report(out: Path, report: dict[str, Any], shown: str) -> Path:
    """Print `report[shown]`, write the whole report to `out/<kind>-<UTC time>.json` (the
    benchmarks' one form), and say where."""
    print(json.dumps(report[shown], indent=2))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{report['kind']}-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return path
