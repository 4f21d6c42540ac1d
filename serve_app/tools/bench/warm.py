"""The warm tier's benchmark: two models that take turns on one GPU, against a cold start.

    python -m serve_app.tools.bench.warm CONFIG [--swaps 20] [--burst 4]
        [--concurrency 64] [--requests 512] [--prompt-tokens 512] [--output-tokens 128]
        [--front haproxy] [--out bench/]

CONFIG holds two models of one `warm_tier.gpu_group` whose memory shares do not fit together
(e.g. 0.6 each), so only one is awake at a time. The run, on a free loopback port:
1. starts the app (every model of CONFIG), which makes the first model sleep for the second to start;
2. swaps `--swaps` times: each turn sends one request to the model that sleeps (its time to first
   token is the wake's: room made on the GPU, weights back), then `--burst` requests at once;
3. runs a closed loop of `--concurrency` streams (random prompts) on the first model, awake,
   with the second asleep on the same GPU;
4. stops the app, starts the first model alone without the tier (its start is the cold start the
   tier spares), and runs the same loop on it.
Prints the figures and writes `warm-<UTC time>.json` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve_app.local.front import add_front_option
from serve_app.local.launcher import free_port
from serve_app.tools.bench.driver import WARMUP, bench_call, level_specs, machine, make_prompt, run_load
from serve_app.tools.bench.report import percentile, summarize
from serve_app.tools.bench.targets import APP, BenchError, OurApp
from serve_app.tools.load import Result, send_one

if TYPE_CHECKING:
    from serve_app.config import AppConfig, ModelConfig


def shared_pair(config: AppConfig) -> tuple[ModelConfig, ModelConfig]:
    """The first two models of one gpu_group."""
    groups: dict[str, list[ModelConfig]] = {}
    for model in config.models:
        if model.warm_tier is not None and model.warm_tier.gpu_group is not None:
            groups.setdefault(model.warm_tier.gpu_group, []).append(model)
    for members in groups.values():
        if len(members) >= 2:
            return members[0], members[1]
    raise BenchError("the config needs two models in one warm_tier.gpu_group")


def without_tier(config: AppConfig, model: ModelConfig) -> AppConfig:
    """The app with `model` alone, as it would run without the warm tier (same memory share)."""
    engine_args = dict(model.engine_args)
    if model.engine == "vllm":
        engine_args["gpu_memory_utilization"] = model.gpu_memory_share
    plain = model.model_copy(update={"warm_tier": None, "engine_args": engine_args})
    return config.model_copy(update={"models": (plain,)})


def swap(url: str, model: str, prompt: str, burst: int, output_tokens: int) -> dict[str, Any]:
    """One turn: a request to a sleeping model (its wake), then `burst` at once."""
    call = bench_call(model, prompt, output_tokens)
    started = time.perf_counter()
    first = send_one(url, call, read_timeout_s=600)
    results: list[Result] = [first]
    if burst:
        with ThreadPoolExecutor(burst) as pool:
            results += list(pool.map(lambda c: send_one(url, c, read_timeout_s=600), [call] * burst))
    return {
        "model": model,
        "wake_ttft_s": round(first.ttft_s, 3) if first.ttft_s is not None else None,
        "turn_s": round(time.perf_counter() - started, 3),
        "requests": len(results),
        "errors": sum(1 for r in results if r.error is not None or not r.done),
        "burst_ttft_p50_ms": _p50_ms([r.ttft_s for r in results[1:]]),
    }


def _p50_ms(values: Sequence[float | None]) -> float | None:
    p50 = percentile([v for v in values if v is not None], 50)
    return None if p50 is None else round(p50 * 1000, 1)


def throughput(url: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    """A warm-up, then a closed loop of `--concurrency` streams of random prompts."""
    call = bench_call(model, "", args.output_tokens, "random")
    run_load(level_specs(url, call, "random", args, WARMUP, min(8, args.concurrency), 8))
    specs = level_specs(
        url, call, "random", args, "level 0", args.concurrency, args.requests, processes=args.load_processes
    )
    results, wall = run_load(specs)
    return summarize(results, wall, args.concurrency)


def tier_states(config: AppConfig) -> dict[str, Any]:
    """Each model's warm tier as its replica reports it (awake or asleep, wakes, sleeps): the
    benchmark runs in the Ray driver of the app it started."""
    from ray import serve

    return {
        m.id: serve.get_deployment_handle(m.deployment_name, APP)
        .warm_tier_state.remote()
        .result(timeout_s=60)
        for m in config.models
    }


def run_tier(config: AppConfig, first: str, second: str, args: argparse.Namespace) -> dict[str, Any]:
    app = OurApp(config, free_port(), args.start_timeout_s, args.front)
    started = time.monotonic()
    print("[tier] starting both models (the second starts once the first sleeps)...", flush=True)
    try:
        url = app.start()
        start_s = time.monotonic() - started
        print(f"[tier] ready in {start_s:.0f} s", flush=True)
        prompt = make_prompt(args.swap_prompt_tokens)
        turns = []
        # Either model may have started last: wake the second (not counted), then begin with the first.
        swap(url, second, prompt, 0, args.swap_output_tokens)
        for index in range(args.swaps):
            model = (first, second)[index % 2]
            turn = swap(url, model, prompt, args.burst, args.swap_output_tokens)
            turns.append(turn)
            print(
                f"[tier] swap {index + 1}/{args.swaps}: {model} first token in {turn['wake_ttft_s']} s, "
                f"{turn['errors']} errors",
                flush=True,
            )
        states = tier_states(config)
        print(f"[tier] after the swaps: {states}", flush=True)
        # The last turn left `second` awake when swaps is even: wake `first` for the loop.
        if args.swaps % 2 == 0:
            swap(url, first, prompt, 0, args.swap_output_tokens)
        load = throughput(url, first, args)
        print(
            f"[tier] {first} awake ({second} asleep): {load['output_tok_s']} tok/s, {load['errors']} errors",
            flush=True,
        )
        return {"start_s": round(start_s, 1), "swaps": turns, "states": states, "throughput": load}
    finally:
        print("[tier] stopping...", flush=True)
        app.stop()


def run_plain(config: AppConfig, model: str, args: argparse.Namespace) -> dict[str, Any]:
    app = OurApp(config, free_port(), args.start_timeout_s, args.front)
    started = time.monotonic()
    print(f"[plain] starting {model} without the tier (a cold start)...", flush=True)
    try:
        url = app.start()
        start_s = time.monotonic() - started
        print(f"[plain] ready in {start_s:.0f} s", flush=True)
        load = throughput(url, model, args)
        print(f"[plain] {model}: {load['output_tok_s']} tok/s, {load['errors']} errors", flush=True)
        return {"start_s": round(start_s, 1), "throughput": load}
    finally:
        print("[plain] stopping...", flush=True)
        app.stop()


def figures(tier: dict[str, Any], plain: dict[str, Any] | None) -> dict[str, Any]:
    wakes = sorted(t["wake_ttft_s"] for t in tier["swaps"] if t["wake_ttft_s"] is not None)
    wake_p50 = percentile(wakes, 50)
    out: dict[str, Any] = {
        "swaps": len(tier["swaps"]),
        "failed_requests": sum(t["errors"] for t in tier["swaps"]) + tier["throughput"]["errors"],
        "wakes": sum(state["wakes"] for state in tier["states"].values()),
        "forced_sleeps": sum(state["sleeps"]["forced"] for state in tier["states"].values()),
        "wake_ttft_p50_s": None if wake_p50 is None else round(wake_p50, 3),
        "wake_ttft_max_s": wakes[-1] if wakes else None,
        "awake_tok_s": tier["throughput"]["output_tok_s"],
    }
    if plain is not None:
        out["cold_start_s"] = plain["start_s"]
        out["plain_tok_s"] = plain["throughput"]["output_tok_s"]
        out["failed_requests"] += plain["throughput"]["errors"]
        if out["plain_tok_s"]:
            out["awake_vs_plain"] = round(out["awake_tok_s"] / out["plain_tok_s"], 3)
    return out


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.tools.bench.warm", description=__doc__.split("\n")[0]
    )
    parser.add_argument("config", type=Path, help="a Serve config with two models in one gpu_group")
    parser.add_argument("--swaps", type=int, default=20, help="turns between the two models (default: 20)")
    parser.add_argument(
        "--burst", type=int, default=4, help="requests sent at once after each wake (default: 4)"
    )
    parser.add_argument("--swap-prompt-tokens", type=int, default=128, help="prompt of the swap requests")
    parser.add_argument("--swap-output-tokens", type=int, default=16, help="max_tokens of the swap requests")
    parser.add_argument("--concurrency", type=int, default=64, help="streams of the throughput loop")
    parser.add_argument("--requests", type=int, default=512, help="requests of the throughput loop")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="random prompt of the loop")
    parser.add_argument("--output-tokens", type=int, default=128, help="max_tokens of the loop")
    parser.add_argument("--load-processes", type=int, default=1, help="processes of the loop's load")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plain", action="store_true", help="skip the run without the tier")
    parser.add_argument("--start-timeout-s", type=float, default=900.0)
    parser.add_argument("--out", type=Path, default=Path("bench"), help="output directory")
    add_front_option(parser)
    args = parser.parse_args(argv)
    args.api_key = None
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from serve_app.config import ConfigError, load_app_config, load_serve_file
    from serve_app.serving.builder import resolve_model

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        serve_file = load_serve_file(args.config)
        config = load_app_config(serve_file.args, source=str(args.config))
        config = config.model_copy(update={"models": tuple(resolve_model(m) for m in config.models)})
        first, second = shared_pair(config)
        tier = run_tier(config, first.id, second.id, args)
        plain = None if args.no_plain else run_plain(without_tier(config, first), first.id, args)
    except (BenchError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    report = {
        "conditions": {
            "utc": stamp,
            "command": [sys.executable, "-m", "serve_app.tools.bench.warm", *sys.argv[1:]],
            "machine": machine(),
            "config": str(args.config),
            "models": [first.model_dump(mode="json"), second.model_dump(mode="json")],
            "front": args.front,
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        },
        "tier": tier,
        "plain": plain,
        "figures": (summary := figures(tier, plain)),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"warm-{stamp}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + json.dumps(summary, indent=2))
    print(f"\nWrote {path}")
    return 0 if summary["failed_requests"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
