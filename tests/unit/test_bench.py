"""The benchmark's pure parts: the `vllm serve` command line, percentiles, summaries, the table,
process labels."""

from __future__ import annotations

import json
import sys

import pytest

from serve_app.config import ModelConfig
from serve_app.local.processes import label_of
from serve_app.tools.bench.cpu import busiest
from serve_app.tools.bench.driver import make_prompt, parse_args
from serve_app.tools.bench.report import compare, format_table, percentile, summarize
from serve_app.tools.bench.vllm_cli import vllm_serve_args
from serve_app.tools.load import Result


def test_vllm_serve_args_flags() -> None:
    model = ModelConfig(
        id="tiny",
        aliases=("tiny-alias",),
        source="./models/tiny",
        engine_args={
            "max_model_len": 4096,
            "enforce_eager": True,
            "enable_prefix_caching": False,
            "limit_mm_per_prompt": {"image": 4},
            "allowed_local_media_path": ["/a", "/b"],
        },
        server_args={"tool_call_parser": "mistral"},
    )
    args = vllm_serve_args(model, 8123)
    assert args[:5] == [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "./models/tiny",
    ]
    assert args[5:12] == [
        "--served-model-name",
        "tiny",
        "tiny-alias",
        "--host",
        "127.0.0.1",
        "--port",
        "8123",
    ]
    rest = args[12:]
    assert rest[rest.index("--max-model-len") + 1] == "4096"
    assert "--enforce-eager" in rest and rest[rest.index("--enforce-eager") + 1].startswith("--")
    assert "--enable-prefix-caching" not in rest and "--no-enable-prefix-caching" not in rest
    assert json.loads(rest[rest.index("--limit-mm-per-prompt") + 1]) == {"image": 4}
    assert json.loads(rest[rest.index("--allowed-local-media-path") + 1]) == ["/a", "/b"]
    assert rest[-2:] == ["--tool-call-parser", "mistral"]


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([7.0], 99) == 7.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 100) == 5.0
    assert percentile([float(i) for i in range(101)], 95) == pytest.approx(95.0)


def test_summary_counts_successful_tokens_over_wall_time() -> None:
    ok = [
        Result(0.0, 1.0, ttft_s=0.1, itl_s=[0.01, 0.03], prompt_tokens=124, completion_tokens=16),
        Result(0.0, 1.0, ttft_s=0.3, itl_s=[0.02], prompt_tokens=124, completion_tokens=16),
    ]
    bad = Result(0.5, 0.1, error="HTTP 503: busy")
    s = summarize([*ok, bad, bad], wall_s=2.0, concurrency=2)
    assert s["requests"] == 4 and s["errors"] == 2 and s["error_kinds"] == {"HTTP 503: busy": 2}
    assert s["output_tokens"] == 32 and s["output_tok_s"] == 16.0 and s["requests_s"] == 1.0
    assert s["ttft_p50_ms"] == 200.0 and s["ttft_p95_ms"] == 290.0
    assert s["itl_p50_ms"] == 20.0
    assert s["prompt_tokens"] == [124]


def _level(c: int, tok_s: float, ttft_ms: float | None) -> dict[str, object]:
    return {
        "concurrency": c,
        "requests": 8,
        "errors": 0,
        "output_tok_s": tok_s,
        "requests_s": 1.0,
        "ttft_p50_ms": ttft_ms,
        "ttft_p95_ms": ttft_ms,
        "itl_p50_ms": 5.0,
        "itl_p99_ms": 9.0,
    }


def test_ratio_table() -> None:
    levels = {
        "vllm": [_level(1, 100.0, 20.0), _level(4, 300.0, 40.0)],
        "ours": [_level(1, 90.0, 25.5), _level(4, 330.0, None), _level(16, 500.0, 60.0)],
    }
    assert compare(levels) == [
        {"concurrency": 1, "output_tok_s_ratio": 0.9, "ttft_p50_diff_ms": 5.5},
        {"concurrency": 4, "output_tok_s_ratio": 1.1, "ttft_p50_diff_ms": None},
    ]
    table = format_table(levels)
    assert "0.900" in table and "+5.5" in table and "1.100" in table
    assert len([line for line in table.splitlines() if line.startswith(("vllm", "ours"))]) == 5
    assert compare({"ours": levels["ours"]}) == []
    assert "ours/vllm" not in format_table({"ours": levels["ours"]})


def test_prompt_and_arguments() -> None:
    assert make_prompt(128).count("ten") == 12
    assert make_prompt(1).count("ten") == 1
    args = parse_args(["--concurrency", "1,4", "--targets", "ours"])
    assert args.concurrency == [1, 4] and args.targets == ["ours"] and args.requests is None
    assert str(args.config) == "configs/local.yaml"
    assert str(parse_args(["configs/x.yaml"]).config) == "configs/x.yaml"
    assert str(parse_args(["--config", "configs/x.yaml"]).config) == "configs/x.yaml"
    with pytest.raises(SystemExit):
        parse_args(["--targets", "vllm,other"])
    with pytest.raises(SystemExit):
        parse_args(["--requests", "8", "--duration-s", "5"])


def test_process_labels_name_ray_workers_and_programs() -> None:
    assert label_of(["ray::ServeReplica:bench:OpenAIIngress", ""]) == "ServeReplica:bench:OpenAIIngress"
    assert label_of(["ray::ProxyActor.receive_asgi_messages"]) == "ProxyActor"  # the method it runs
    replica = "ServeReplica:app:mistralai--Mistral-7B-Instruct-v0.3"
    assert label_of([f"ray::{replica}.initialize_and_get_metadata"]) == replica
    assert label_of([f"ray::{replica}"]) == replica
    assert label_of(["VLLM::EngineCore"]) == "VLLM::EngineCore"
    assert label_of(["/usr/bin/python3", "-m", "vllm.entrypoints.openai.api_server"]) == (
        "python3 -m vllm.entrypoints.openai.api_server"
    )
    assert label_of(["/opt/haproxy", "-f", "x.cfg"]) == "haproxy"
    assert label_of(["/venv/lib/ray/core/src/ray/raylet/raylet", "--node_ip_address=127.0.0.1"]) == "raylet"
    assert label_of(["/venv/bin/python", "/venv/lib/ray/dashboard/dashboard.py", "--host=x"]) == "dashboard"
    assert label_of([]) == "?"


def test_busiest_ranks_processes_by_cpu_used_during_the_level() -> None:
    before = {1: ("proxy", 10.0), 2: ("engine", 5.0), 3: ("idle", 1.0)}
    after = {1: ("proxy", 14.0), 2: ("engine", 13.0), 3: ("idle", 1.0), 4: ("new", 0.5)}
    rows = busiest(before, after, wall_s=10.0, output_tokens=20_000, top=3)
    assert [r["process"] for r in rows] == ["engine", "proxy", "new"]  # nothing for one that did no work
    assert rows[0] == {"process": "engine", "cpu_s": 8.0, "cores": 0.8, "cpu_ms_per_1k_tokens": 400.0}
    assert rows[2]["cpu_s"] == 0.5  # a process that started during the level counts from zero
