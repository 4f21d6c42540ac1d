"""The benchmark's figures: per-level summaries, the ours/plain-vLLM comparison, the table and
the plot."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
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


def _ms(seconds: float | None) -> float | None:
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
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        "ttft_p95_ms": _ms(percentile(ttft, 95)),
        "itl_p50_ms": _ms(percentile(itl, 50)),
        "itl_p99_ms": _ms(percentile(itl, 99)),
        "prompt_tokens": sorted({r.prompt_tokens for r in ok if r.prompt_tokens is not None}),
    }


def compare(levels: dict[str, list[dict[str, Any]]], baseline: str = "vllm") -> list[dict[str, Any]]:
    """Per concurrency run by both targets: ours/baseline output tok/s, ours - baseline TTFT p50 (ms)."""
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


def format_table(levels: dict[str, list[dict[str, Any]]], labels: dict[str, str] | None = None) -> str:
    """The result table (times in ms), then ours against each plain vLLM target that ran.
    `labels` name targets in the table (`vllm-multi N=2`); default: their names."""
    labels = labels or {}
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
    rows = [head]
    for target, target_levels in levels.items():
        for lv in target_levels:
            rows.append(
                (
                    labels.get(target, target),
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
            )
    lines = [_row(rows, r) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    for baseline in BASELINES:
        comparison = compare(levels, baseline)
        if not comparison:
            continue
        name = labels.get(baseline, baseline)
        crows = [("conc", f"tok/s ours/{name}", f"TTFT p50 ours-{name} (ms)")]
        for row in comparison:
            ratio, diff = row["output_tok_s_ratio"], row["ttft_p50_diff_ms"]
            crows.append(
                (
                    str(row["concurrency"]),
                    "-" if ratio is None else f"{ratio:.3f}",
                    "-" if diff is None else f"{diff:+.1f}",
                )
            )
        lines += ["", *(_row(crows, r) for r in crows)]
    return "\n".join(lines) + "\n(latencies in ms)"


def cpu_line(cpu: Sequence[dict[str, Any]]) -> str:
    return ", ".join(
        f"{p['process']} {p['cores']:.2f} cores ({cell(p['cpu_ms_per_1k_tokens'])} ms/1k tok)" for p in cpu
    )


def _row(rows: Sequence[Sequence[str]], row: Sequence[str]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(row))]
    return "  ".join(
        cell.ljust(w) if i == 0 else cell.rjust(w)
        for i, (cell, w) in enumerate(zip(row, widths, strict=True))
    )


def plot(
    levels: dict[str, list[dict[str, Any]]], title: str, out: Path, labels: dict[str, str] | None = None
) -> None:
    """Output tok/s and TTFT p50 against concurrency, one line per target, ratios annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tok, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.5))
    concurrencies: set[int] = set()
    for target, target_levels in levels.items():
        xs = [lv["concurrency"] for lv in target_levels]
        concurrencies |= set(xs)
        label = (labels or {}).get(target, target)
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
    ax_tok.set_title("throughput (label: ours / vllm)", fontsize=10)
    ax_ttft.set_title("time to first token (label: ours - vllm)", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_report(report: dict[str, Any], out: Path) -> None:
    """The plot of a report as `run_bench` writes it."""
    cond = report["conditions"]
    levels = {target: r["levels"] for target, r in report["results"].items()}
    labels = {target: r.get("label", target) for target, r in report["results"].items()}
    machine = cond.get("machine", {})
    gpu = f", {machine['gpus'][0]}" if machine.get("gpus") else ""
    counted = cond.get("prompt_tokens_counted") or []
    title = (
        f"{cond['model']}: {'/'.join(map(str, counted)) or '?'} prompt ({cond.get('prompts', 'repeated')}) / "
        f"{cond['output_tokens']} output tokens; "
        f"{machine.get('cpu', '?')} x{machine.get('cores', '?')}{gpu}"
    )
    plot(levels, title, out, labels)
