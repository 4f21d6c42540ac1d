"""The Grafana dashboard (shipped in serve_app/tools) and serve_app.tools.dashboard, which reads and renders it.

Rendering runs against a fake Prometheus (http.server in a thread) that answers query_range with
a matrix; nothing else starts.
"""

from __future__ import annotations

import ast
import json
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from serve_app.serving import telemetry
from serve_app.tools import dashboard as dash
from serve_app.tools.dashboard import DashboardError, metric_names, substitute

ROWS = ["Traffic", "Latency", "Capacity", "Scaling", "Errors", "Warm tier", "Batches"]


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    return dash.load_dashboard()


def _exprs(board: dict[str, Any]) -> list[str]:
    return [expr for panel in dash.panels(board) for expr, _ in panel.targets]


# ---------------------------------------------------------------------------------------------
# The dashboard JSON


def test_dashboard_identity_and_variables(board: dict[str, Any]) -> None:
    assert (board["uid"], board["title"], board["schemaVersion"]) == ("mistral-serve", "mistral-serve", 39)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    model = variables["model"]
    assert model["query"]["query"] == "label_values(ray_mistral_serve_requests_total, model)"
    assert model["multi"] is True and model["includeAll"] is True and model["allValue"] == ".*"
    assert model["datasource"]["uid"] == "${datasource}"


def test_dashboard_has_its_rows(board: dict[str, Any]) -> None:
    assert [p["title"] for p in board["panels"] if p["type"] == "row"] == ROWS
    assert [r for r in ROWS if not any(p.row == r for p in dash.panels(board))] == []
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))


def test_every_panel_queries_the_datasource_variable(board: dict[str, Any]) -> None:
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["type"] == "timeseries"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"] in set(dash._UNIT_LABELS)
        targets = panel["targets"]
        assert targets and any(t["datasource"]["uid"] == "${datasource}" for t in targets), panel["title"]


def _balanced(expr: str) -> bool:
    pairs = {")": "(", "]": "[", "}": "{"}
    stack: list[str] = []
    for ch in dash._STRING.sub('""', expr):
        if ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return False
    return not stack


def test_every_expr_parses_and_filters_the_model(board: dict[str, Any]) -> None:
    exprs = _exprs(board)
    assert len(exprs) >= 15
    for expr in exprs:
        assert _balanced(expr), expr
        names = metric_names(expr)
        assert names, expr
        if any(n.startswith("ray_mistral_serve_") for n in names):
            # Each selector of our metrics carries the filter.
            assert expr.count("ray_mistral_serve_") == expr.count('{model=~"$model"'), expr
        if any(n.startswith("ray_vllm_") for n in names):
            assert expr.count("ray_vllm_") == expr.count('{model_name=~"$model"'), expr
        if "rate(" in expr:
            assert "[$__rate_interval]" in expr, expr


def test_dashboard_metric_names(board: dict[str, Any]) -> None:
    names = dash.dashboard_metric_names(board)
    assert "ray_mistral_serve_requests_total" in names
    assert "ray_vllm_time_to_first_token_seconds_bucket" in names
    assert "ray_serve_autoscaling_target_replicas" in names
    assert all(n.startswith(("ray_mistral_serve_", "ray_vllm_", "ray_serve_")) for n in names), names


def _app_metrics() -> dict[str, tuple[str, set[str]]]:
    """The metrics serve_app/serving/telemetry.py defines, by the names Prometheus scrapes:
    `ray_` before each name, `_total` after a counter's, `_bucket`/`_sum`/`_count` after a
    histogram's; each with its kind and label names (tag_keys)."""
    tree = ast.parse(Path(telemetry.__file__).read_text())
    tuples: dict[str, set[str]] = {}  # names bound to a tuple of label names (by_model = ("model",))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    keys = {ast.literal_eval(e) for e in node.value.elts}
                    assert tuples.setdefault(target.id, keys) == keys, f"{target.id} bound twice"
    out: dict[str, tuple[str, set[str]]] = {}
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "metrics"
        ):
            continue
        kind, name = node.func.attr, ast.literal_eval(node.args[0])
        tag_keys = next(k.value for k in node.keywords if k.arg == "tag_keys")
        labels = tuples[tag_keys.id] if isinstance(tag_keys, ast.Name) else set(ast.literal_eval(tag_keys))
        suffixes = {"Counter": ["_total"], "Gauge": [""], "Histogram": ["_bucket", "_sum", "_count"]}[kind]
        for suffix in suffixes:
            out[f"ray_{name}{suffix}"] = (kind, labels | ({"le"} if suffix == "_bucket" else set()))
    return out


def test_app_metrics_reads_telemetry() -> None:
    metrics = _app_metrics()
    assert metrics["ray_mistral_serve_requests_total"] == ("Counter", {"model", "adapter", "route", "status"})
    assert metrics["ray_mistral_serve_queue_wait_seconds_bucket"] == ("Histogram", {"model", "le"})
    assert metrics["ray_mistral_serve_engine_running_requests"] == ("Gauge", {"model", "replica"})
    assert metrics["ray_mistral_serve_model_awake"] == ("Gauge", {"model", "replica"})
    assert metrics["ray_mistral_serve_model_sleeps_total"] == ("Counter", {"model", "reason"})
    assert "ray_mistral_serve_model_wake_seconds_count" in metrics
    assert "ray_mistral_serve_model_awake_total" not in metrics


def _labels(expr: str) -> set[str]:
    """Label names an expression groups by or matches on."""
    text = dash._STRING.sub('""', expr)
    grouped = {
        label.strip()
        for m in dash._GROUPING.finditer(text)
        for label in m.group(0)[m.group(0).index("(") + 1 : -1].split(",")
        if label.strip()
    }
    matched = {
        m.group(1) for m in re.finditer(r"(\w+)\s*(?:=~|!~|!=|=)", " ".join(re.findall(r"\{[^}]*\}", text)))
    }
    return grouped | matched


def test_our_metrics_on_the_dashboard_are_the_apps(board: dict[str, Any]) -> None:
    """Every `ray_mistral_serve_*` name the dashboard reads is one telemetry.py defines, with the
    labels it groups by and filters on; and every metric the app defines has a panel."""
    metrics = _app_metrics()
    used = {n for n in dash.dashboard_metric_names(board) if n.startswith("ray_mistral_serve_")}
    assert sorted(used - set(metrics)) == []
    for expr in _exprs(board):
        names = metric_names(expr)
        if names and all(n in metrics for n in names):
            known = set().union(*(metrics[n][1] for n in names))
            assert _labels(expr) <= known, expr

    def base(name: str) -> str:
        return name if metrics[name][0] == "Gauge" else re.sub(r"_(total|bucket|sum|count)$", "", name)

    assert sorted({base(n) for n in metrics} - {base(n) for n in used}) == []


def _row(board: dict[str, Any], row: str) -> dict[str, dash.Panel]:
    return {p.title: p for p in dash.panels(board) if p.row == row}


def test_warm_tier_row(board: dict[str, Any]) -> None:
    warm = _row(board, "Warm tier")
    assert list(warm) == [
        "Replicas awake / asleep",
        "Wakes per minute",
        "Wake time",
        "Sleeps per minute by reason",
    ]

    awake = warm["Replicas awake / asleep"]
    assert awake.unit == "short"
    assert [fmt for _, fmt in awake.targets] == ["{{model}} awake", "{{model}} asleep"]
    # The gauge is 1 awake, 0 asleep: a sum counts the replicas awake, a sum of 1 - x those asleep.
    assert [metric_names(expr) for expr, _ in awake.targets] == [{"ray_mistral_serve_model_awake"}] * 2
    assert [_labels(expr) for expr, _ in awake.targets] == [{"model"}] * 2
    assert "(1 - ray_mistral_serve_model_awake" in awake.targets[1][0]

    wakes = warm["Wakes per minute"]
    assert (wakes.unit, [fmt for _, fmt in wakes.targets]) == ("opm", ["{{model}}"])
    ((expr, _),) = wakes.targets
    assert expr.startswith("60 * sum by (model) (rate(")
    assert metric_names(expr) == {"ray_mistral_serve_model_wakes_total"}

    wake_time = warm["Wake time"]
    assert wake_time.unit == "s"
    assert [fmt for _, fmt in wake_time.targets] == ["{{model}} p50", "{{model}} p95"]
    for (expr, _), q in zip(wake_time.targets, ("0.5", "0.95"), strict=True):
        assert expr.startswith(f"histogram_quantile({q}, sum by (le, model) (rate("), expr
        assert metric_names(expr) == {"ray_mistral_serve_model_wake_seconds_bucket"}

    sleeps = warm["Sleeps per minute by reason"]
    assert (sleeps.unit, [fmt for _, fmt in sleeps.targets]) == ("opm", ["{{model}} {{reason}}"])
    ((expr, _),) = sleeps.targets
    assert expr.startswith("60 * sum by (model, reason) (rate(")
    assert metric_names(expr) == {"ray_mistral_serve_model_sleeps_total"}


@pytest.mark.parametrize(("title", "cells"), [("Warm tier", 4), ("Batches", 3)])
def test_the_last_rows_are_laid_out_below_the_rest(board: dict[str, Any], title: str, cells: int) -> None:
    top = board["panels"]
    row = next(i for i, p in enumerate(top) if p["type"] == "row" and p["title"] == title)
    above = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in top[:row])
    assert top[row]["gridPos"] == {"h": 1, "w": 24, "x": 0, "y": above}
    panels = top[row + 1 : row + 1 + cells]
    grid = [(0, above + 1), (8, above + 1), (16, above + 1), (0, above + 9)][:cells]
    assert [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in panels] == grid
    assert all(p["gridPos"]["w"] == 8 and p["gridPos"]["h"] == 8 for p in panels)


def test_batches_row(board: dict[str, Any]) -> None:
    batches = _row(board, "Batches")
    assert list(batches) == ["Batch requests queued / running", "Batch requests answered/s", "Batch tokens/s"]
    expected = [
        ("ray_mistral_serve_batch_lines", {"model", "state"}),
        ("ray_mistral_serve_batch_lines_answered_total", {"model", "outcome"}),
        ("ray_mistral_serve_batch_tokens_total", {"model", "kind"}),
    ]
    for panel, (name, labels) in zip(batches.values(), expected, strict=True):
        ((expr, _),) = panel.targets
        assert metric_names(expr) == {name} and _labels(expr) == labels, expr


# ---------------------------------------------------------------------------------------------
# metric_names and substitute


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('rate(foo_total{a="b"}[5m])', {"foo_total"}),
        (
            'histogram_quantile(0.95, sum by (le, model) (rate(x_bucket{model=~"$model"}[$__rate_interval])))',
            {"x_bucket"},
        ),
        (
            "sum(rate(a_total[1m])) by (le) / on (model) group_left (x) sum without (pod) (b)",
            {"a_total", "b"},
        ),
        ('count by (model) (g{model=~"$model"}) or 0 * h', {"g", "h"}),
        ('label_replace(m, "dst", "$1", "src", "(sum|rate)\\\\(.*")', {"m"}),
        ('sum(x{s="}{[by (y)"}) and bool y unless z', {"x", "y", "z"}),
        ("rate(x[5m:1m] offset 1h30m) > 1e3 + Inf + NaN - 0x1f", {"x"}),
        ("x @ start() + y @ 1609746000", {"x", "y"}),
        ('{__name__="ns:metric:rate5m", job="j"} + {job="only"}', {"ns:metric:rate5m"}),
        ("sum by(model)(a${model}b)", {"a", "b"}),
        ("abs (x) # trailing comment with y\n+ z", {"x", "z"}),
        ("vector(1) + time()", set()),
    ],
)
def test_metric_names(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_substitute() -> None:
    vars_ = {"model": "a|b", "__rate_interval": "1m"}
    assert substitute('rate(x{model=~"$model"}[$__rate_interval])', vars_) == 'rate(x{model=~"a|b"}[1m])'
    assert substitute('x{m=~"${model}", n="[[model]]", o="${model:regex}"}', vars_) == (
        'x{m=~"a|b", n="a|b", o="a|b"}'
    )
    # Longer names are not prefixes of shorter ones; unknown variables stay.
    assert substitute("$models $model_x $__interval $model", vars_) == "$models $model_x $__interval a|b"


def test_legend() -> None:
    labels = {"model": "m", "status": "200"}
    assert dash.legend("{{model}} {{ status }} {{missing}}", labels) == "m 200"
    assert dash.legend("", {"__name__": "x", "a": "1"}) == 'x{a="1"}'
    assert dash.legend("{{missing}}", {"a": "1"}) == '{a="1"}'


def test_panels_reads_collapsed_rows() -> None:
    board = {
        "panels": [
            {"type": "timeseries", "title": "top", "targets": [{"expr": "a"}]},
            {
                "type": "row",
                "title": "R",
                "collapsed": True,
                "panels": [
                    {"type": "timeseries", "title": "in", "targets": [{"expr": "b", "legendFormat": "L"}]}
                ],
            },
            {"type": "text", "title": "no queries"},
        ]
    }
    got = [(p.row, p.title, p.unit, p.targets) for p in dash.panels(board)]
    assert got == [("", "top", "short", [("a", "")]), ("R", "in", "short", [("b", "L")])]


def test_load_dashboard_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DashboardError, match="cannot read"):
        dash.load_dashboard(bad)
    bad.write_text("[]")
    with pytest.raises(DashboardError, match="not a Grafana dashboard"):
        dash.load_dashboard(bad)
    with pytest.raises(DashboardError, match="cannot read"):
        dash.load_dashboard(tmp_path / "missing.json")


# ---------------------------------------------------------------------------------------------
# render against a fake Prometheus


def _series_for(query: str) -> int:
    """How many series the fake answers: 0 for KV-cache and vLLM queries, 2 for request counts, else 1."""
    if "kv_cache" in query or "ray_vllm_" in query:
        return 0
    return 2 if "requests_total" in query else 1


class _FakePrometheus(BaseHTTPRequestHandler):
    queries: list[str] = []

    def do_GET(self) -> None:
        url = urlparse(self.path)
        params = {k: v[0] for k, v in parse_qs(url.query).items()}
        if url.path != "/api/v1/query_range":
            self.send_error(404)
            return
        self.queries.append(params["query"])
        start, end, step = float(params["start"]), float(params["end"]), float(params["step"])
        times = [start + i * step for i in range(int((end - start) // step) + 1)]
        result = [
            {
                "metric": {"model": "m", "status": f"{200 + i}", "replica": f"r{i}"},
                "values": [[t, str(0.1 * (i + 1))] for t in times],
            }
            for i in range(_series_for(params["query"]))
        ]
        body = json.dumps({"status": "success", "data": {"resultType": "matrix", "result": result}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def prometheus() -> Iterator[tuple[str, list[str]]]:
    _FakePrometheus.queries = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakePrometheus)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _FakePrometheus.queries
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _expected(panel: dash.Panel) -> int:
    return sum(_series_for(expr) for expr, _ in panel.targets)


def test_render_draws_every_panel(
    board: dict[str, Any], prometheus: tuple[str, list[str]], tmp_path: Path
) -> None:
    url, queries = prometheus
    out = tmp_path / "sub" / "board.png"
    counts = dash.render(url, board, out, 1_700_000_000.0, 1_700_000_600.0, 15.0, model_regex="m|n")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p, _ in counts] == [p.name for p in dash.panels(board)]
    assert [n for _, n in counts] == [_expected(p) for p, _ in counts]
    assert any(n == 0 for _, n in counts)  # drawn as "no data"
    assert len(queries) == len(_exprs(board))
    assert all("$" not in q for q in queries), queries
    assert any('model=~"m|n"' in q and "[60s]" in q for q in queries)


def test_render_selected_rows(
    board: dict[str, Any], prometheus: tuple[str, list[str]], tmp_path: Path
) -> None:
    url, _ = prometheus
    out = tmp_path / "rows.png"
    counts = dash.render(url, board, out, 1_700_000_000.0, 1_700_000_300.0, 30.0, rows=["capacity"])
    assert {p.row for p, _ in counts} == {"Capacity"}
    assert out.read_bytes()[:4] == b"\x89PNG"
    counts = dash.render(url, board, out, 1_700_000_000.0, 1_700_000_300.0, 30.0, rows=["warm tier"])
    assert [(p.title, n) for p, n in counts] == [
        ("Replicas awake / asleep", 2),
        ("Wakes per minute", 1),
        ("Wake time", 2),
        ("Sleeps per minute by reason", 1),
    ]
    with pytest.raises(DashboardError, match="no row named Nope"):
        dash.render(url, board, out, 1_700_000_000.0, 1_700_000_300.0, 30.0, rows=["Nope"])


def test_cli_render_and_metrics(
    board: dict[str, Any],
    prometheus: tuple[str, list[str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, _ = prometheus
    out = tmp_path / "cli.png"
    argv = ["render", "--prometheus", url, "--out", str(out), "--minutes", "5", "--rows", "Scaling"]
    assert dash.main(argv) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "Scaling / Replicas per model: 1 series" in capsys.readouterr().out

    assert dash.main(["metrics"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == sorted(dash.dashboard_metric_names(board))


def test_cli_errors_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = ["render", "--prometheus", f"http://127.0.0.1:{port}", "--out", str(tmp_path / "x.png")]
    assert dash.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach Prometheus") and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()

    (tmp_path / "bad.json").write_text("{")
    assert dash.main(["metrics", "--dashboard", str(tmp_path / "bad.json")]) == 1
    assert capsys.readouterr().err.startswith("error: cannot read dashboard")


def test_export_writes_the_shipped_dashboard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "board.json"
    assert dash.main(["export", str(out)]) == 0
    assert json.loads(out.read_text())["uid"] == "mistral-serve"
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert dash.main(["export"]) == 0
    assert json.loads(capsys.readouterr().out)["uid"] == "mistral-serve"


def test_the_dashboard_ships_inside_the_package() -> None:
    """An installed wheel has it too: it is package data, beside the module that reads it."""
    import tomllib

    from tests.conftest import ROOT

    assert dash.DEFAULT_DASHBOARD.parent == Path(dash.__file__).parent
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert dash.DEFAULT_DASHBOARD.name in {
        p.replace("*", dash.DEFAULT_DASHBOARD.stem) for p in data["serve_app.tools"]
    }
