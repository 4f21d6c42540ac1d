"""The Grafana dashboard (mistral-serve-dashboard.json, beside this module), read outside Grafana: its metric names, and its panels as a PNG.

    python -m serve_app.tools.dashboard metrics
    python -m serve_app.tools.dashboard export [mistral-serve-dashboard.json]
    python -m serve_app.tools.dashboard render --prometheus http://127.0.0.1:9090 --out docs/x.png \\
        --minutes 10 [--rows Traffic,Latency] [--model REGEX]

`render` runs every panel's queries against Prometheus's HTTP API (`/api/v1/query_range`), with
Grafana's variables substituted, and draws one subplot per panel. The dashboard JSON is the only
list of the metric names the dashboard uses.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

# Shipped inside the package, so that an installed wheel has it too (cluster/README.md loads it into Grafana).
DEFAULT_DASHBOARD = Path(__file__).resolve().parent / "mistral-serve-dashboard.json"


class DashboardError(Exception):
    """A dashboard that cannot be read, or a Prometheus that cannot answer."""


@dataclass
class Panel:
    row: str
    title: str
    unit: str
    targets: list[tuple[str, str]] = field(default_factory=list)  # (expr, legendFormat)

    @property
    def name(self) -> str:
        return f"{self.row} / {self.title}" if self.row else self.title


def load_dashboard(path: Path | str = DEFAULT_DASHBOARD) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DashboardError(f"cannot read dashboard {path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("panels"), list):
        raise DashboardError(f"{path} is not a Grafana dashboard (no 'panels' list)")
    return data


def panels(dashboard: Mapping[str, Any]) -> list[Panel]:
    """Panels with queries, in order, each with the title of the row above it (collapsed rows too)."""
    out: list[Panel] = []
    row = ""

    def add(panel: Mapping[str, Any]) -> None:
        targets = [
            (t["expr"], t.get("legendFormat") or "")
            for t in panel.get("targets") or []
            if isinstance(t, dict) and isinstance(t.get("expr"), str) and t["expr"].strip()
        ]
        if targets:
            unit = ((panel.get("fieldConfig") or {}).get("defaults") or {}).get("unit") or "short"
            out.append(Panel(row, str(panel.get("title", "")), str(unit), targets))

    for panel in dashboard.get("panels") or []:
        if not isinstance(panel, dict):
            raise DashboardError(f"panel is not an object: {panel!r}")
        if panel.get("type") == "row":
            row = str(panel.get("title", ""))
            for inner in panel.get("panels") or []:  # a collapsed row holds its panels
                add(inner)
        else:
            add(panel)
    return out


# ---------------------------------------------------------------------------------------------
# PromQL, as far as finding metric names needs

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NAME_MATCHER = re.compile(r'__name__\s*=(?!~)\s*("(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`)')
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+|\[\[[^\]]*\]\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE)
_TOKEN = re.compile(r"(?P<num>\.?\d[\w.]*)|(?P<ident>[A-Za-z_:][\w:]*)")
_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
    "atan2",
    "inf",
    "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads, as written (`x_bucket` stays `x_bucket`)."""
    names = {m.group(1)[1:-1] for m in _NAME_MATCHER.finditer(expr)}
    text = _STRING.sub('""', expr)
    text = re.sub(r"#[^\n]*", " ", text)
    text = _VARIABLE.sub(" ", text)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges, subqueries
    text = _GROUPING.sub(" ", text)
    for m in _TOKEN.finditer(text):
        ident = m.group("ident")
        if ident is None or ident.lower() in _KEYWORDS:
            continue
        if text[m.end() :].lstrip().startswith("("):  # a function or aggregation
            continue
        names.add(ident)
    return names


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """Replace Grafana variables (`$x`, `${x}`, `${x:format}`, `[[x]]`) that `variables` names."""

    def value(m: re.Match[str]) -> str:
        token = m.group(0)
        if token.startswith("${"):
            name = token[2:-1].split(":", 1)[0]
        elif token.startswith("[["):
            name = token[2:-2].split(":", 1)[0]
        else:
            name = token[1:]
        return variables.get(name, token)

    return _VARIABLE.sub(value, expr)


def dashboard_metric_names(dashboard: Mapping[str, Any]) -> set[str]:
    """Metric names of every panel query and of `label_values(...)` template variables."""
    names: set[str] = set()
    for panel in panels(dashboard):
        for expr, _ in panel.targets:
            names |= metric_names(expr)
    for var in (dashboard.get("templating") or {}).get("list") or []:
        query = var.get("query") if var.get("type") == "query" else None
        query = query.get("query") if isinstance(query, dict) else query
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query or "", re.DOTALL)
        if m:
            names |= metric_names(m.group(1))
    return names


# ---------------------------------------------------------------------------------------------
# Rendering


def query_range(
    client: httpx.Client, prometheus_url: str, expr: str, start: float, end: float, step: float
) -> list[dict[str, Any]]:
    """The matrix Prometheus answers for `expr`: [{"metric": {...}, "values": [[t, "v"], ...]}]."""
    url = f"{prometheus_url.rstrip('/')}/api/v1/query_range"
    try:
        resp = client.get(url, params={"query": expr, "start": start, "end": end, "step": step})
    except httpx.HTTPError as exc:
        raise DashboardError(f"cannot reach Prometheus at {prometheus_url}: {exc}") from exc
    try:
        body = resp.json()
    except ValueError:
        raise DashboardError(f"{url} answered {resp.status_code} without JSON") from None
    if body.get("status") != "success":
        raise DashboardError(f"Prometheus rejected {expr!r}: {body.get('errorType')}: {body.get('error')}")
    result = body.get("data", {}).get("result", [])
    return result if isinstance(result, list) else []


def legend(fmt: str, labels: Mapping[str, str]) -> str:
    """Grafana's legendFormat: `{{label}}` replaced by the series' label value; the label set if empty."""
    text = re.sub(r"\{\{\s*([\w.]+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()
    if text and fmt != "__auto":
        return text
    inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
    return f"{labels.get('__name__', '')}{{{inner}}}"


_TICKS_S = (10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


def _clock(t: float, _pos: int | None = None) -> str:
    when = datetime.fromtimestamp(t, tz=timezone.utc)
    return f"{when:%H:%M}" if when.second == 0 else f"{when:%H:%M:%S}"


_UNIT_LABELS = {"s": "seconds", "reqps": "requests/s", "opm": "per minute", "percentunit": "", "short": ""}


def render(
    prometheus_url: str,
    dashboard: Mapping[str, Any],
    out_png: Path | str,
    start: float,
    end: float,
    step: float,
    model_regex: str = ".*",
    rows: Sequence[str] | None = None,
    *,
    rate_interval: str | None = None,
    timeout_s: float = 30.0,
) -> list[tuple[Panel, int]]:
    """Draw the dashboard's panels (of `rows`, default all) over [start, end] (unix seconds) to a PNG.

    `$__rate_interval` defaults to max(60 s, step + 15 s), as Grafana sets it for a 15 s scrape.
    Returns each panel with the number of series its queries returned.
    """
    selected = panels(dashboard)
    if rows is not None:
        known = {p.row.lower(): p.row for p in selected}
        unknown = [r for r in rows if r.lower() not in known]
        if unknown:
            raise DashboardError(f"no row named {', '.join(unknown)} (rows: {', '.join(known.values())})")
        wanted = {r.lower() for r in rows}
        selected = [p for p in selected if p.row.lower() in wanted]
    if not selected:
        raise DashboardError("the dashboard has no panels with queries")
    variables = {
        "model": model_regex,
        "__rate_interval": rate_interval or f"{max(60, math.ceil(step) + 15)}s",
        "__interval": f"{math.ceil(step)}s",
    }

    data: list[tuple[Panel, list[tuple[str, list[float], list[float]]]]] = []
    with httpx.Client(timeout=timeout_s) as client:
        for panel in selected:
            series = []
            for expr, fmt in panel.targets:
                query = substitute(expr, variables)
                for s in query_range(client, prometheus_url, query, start, end, step):
                    try:
                        ts, vs = [float(t) for t, _ in s["values"]], [float(v) for _, v in s["values"]]
                    except (KeyError, TypeError, ValueError) as exc:
                        raise DashboardError(
                            f"Prometheus answered {query!r} with no matrix: {exc!r}"
                        ) from exc
                    series.append((legend(fmt, s.get("metric", {})), ts, vs))
            data.append((panel, series))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MultipleLocator, PercentFormatter

    span = end - start
    tick = next((t for t in _TICKS_S if span / t <= 6), span)

    ncols = min(3, len(data))
    nrows = math.ceil(len(data) / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(6.0 * ncols, 3.4 * nrows), squeeze=False, layout="constrained"
    )
    flat = list(axes.flat)
    for ax, (panel, series) in zip(flat, data, strict=False):
        ax.set_title(panel.name, fontsize=9)
        if not series:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for label, ts, vs in series:
            ax.plot(ts, vs, label=label, lw=1)
        ax.set_xlim(start, end)
        if all(v >= 0 for _, _, vs in series for v in vs if math.isfinite(v)):
            ax.set_ylim(bottom=0)
        ax.xaxis.set_major_locator(MultipleLocator(tick))
        ax.xaxis.set_major_formatter(FuncFormatter(_clock))
        if panel.unit == "percentunit":
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
        ax.set_ylabel(_UNIT_LABELS.get(panel.unit, panel.unit), fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="upper left")
    for ax in flat[len(data) :]:
        ax.set_visible(False)
    fig.suptitle(
        f"{dashboard.get('title', 'dashboard')}  "
        f"{datetime.fromtimestamp(start, tz=timezone.utc):%Y-%m-%d %H:%M}"
        f" to {datetime.fromtimestamp(end, tz=timezone.utc):%H:%M} UTC",
        fontsize=11,
    )
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return [(panel, len(series)) for panel, series in data]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dashboard", type=Path, default=DEFAULT_DASHBOARD, help="dashboard JSON")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "metrics", parents=[common], help="print the metric names the dashboard uses, one per line"
    )
    export = sub.add_parser("export", help="write the dashboard's JSON, for Grafana (default: to stdout)")
    export.add_argument("out", nargs="?", type=Path)
    rend = sub.add_parser("render", parents=[common], help="draw the panels from Prometheus to a PNG")
    rend.add_argument("--prometheus", default="http://127.0.0.1:9090", help="Prometheus URL")
    rend.add_argument("--out", type=Path, required=True)
    rend.add_argument("--minutes", type=float, default=10.0, help="the last N minutes")
    rend.add_argument("--step", type=float, help="seconds between points (default: minutes * 60 / 120, >= 5)")
    rend.add_argument("--rows", help="comma-separated row titles (default: all)")
    rend.add_argument("--model", default=".*", help="regex for $model (default: all)")
    args = parser.parse_args(argv)
    if args.command == "export":
        text = DEFAULT_DASHBOARD.read_text()
        if args.out is None:
            sys.stdout.write(text)
        else:
            args.out.write_text(text)
            print(f"wrote {args.out}")
        return 0
    try:
        dashboard = load_dashboard(args.dashboard)
        if args.command == "metrics":
            for name in sorted(dashboard_metric_names(dashboard)):
                print(name)
            return 0
        end = time.time()
        step = args.step or max(5.0, args.minutes * 60 / 120)
        rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
        counts = render(
            args.prometheus, dashboard, args.out, end - args.minutes * 60, end, step, args.model, rows
        )
    except DashboardError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for panel, n in counts:
        print(f"{panel.name}: {n} series" if n else f"{panel.name}: no data")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
