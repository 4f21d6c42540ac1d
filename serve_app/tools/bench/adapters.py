"""The benchmark of LoRA adapters on a model's replicas: what a first request to an adapter no
replica holds costs, and steady traffic spread over many adapters against base-model traffic.

    python -m serve_app.tools.bench.adapters CONFIG [--model ID] [--per-replica 2,4]
        [--adapters N] [--first 3] [--first-output-tokens 16] [--requests 192]
        [--concurrency 8] [--prompt-words 64] [--output-tokens 32] [--seed 0]
        [--front haproxy] [--out bench/]

For each value of `--per-replica`, in order, the app serves the model of CONFIG (the first, or
`--model`) with that `lora.max_adapters_per_replica`, with the replicas and ingress replicas
that CONFIG gives, on a private Ray and a free loopback port. The adapters are the first
`--adapters` of the model's config (default: all). On each deployment, after a few base-model
requests to warm the engines:
1. first request: for each of the first `--first` adapters in turn, one request (the adapter is
   then loaded nowhere) and a second to the same adapter, one at a time, streamed,
   `--first-output-tokens` out; their times to first token, and the replicas' load times;
2. base: `--requests` streamed chats to the base model, `--concurrency` at a time in a closed
   loop, each a new question of `--prompt-words` words, `--output-tokens` out (ignore_eos);
3. mixed: as many chats of the same shape, each naming one of the adapters drawn uniformly at
   random (seeded): output tokens/s, time to first token, and the share of the requests that
   found their adapter already loaded on the replica that took them (`held`, against `loaded`
   and `failed`, from the replicas' `ray_mistral_serve_adapter_requests_total`), per replica too.
Prints each setting's figures and writes `adapters-<UTC time>.json` to `--out`. Load times come
from the replicas' `mistral_serve_adapter_load_seconds` histogram, whose mean Ray's export
reckons from bucket midpoints; the buckets' counts are exact.

With A adapters used uniformly and R replicas holding P each, at most R*P of them are loaded at
a time: the held share cannot pass about R*P/A while that is under 1.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve_app.local.front import add_front_option
from serve_app.local.launcher import free_port
from serve_app.tools.bench.driver import _int_list, machine
from serve_app.tools.bench.report import ms, percentile, save_report, summarize
from serve_app.tools.bench.targets import BenchError, OurApp, load_bench_model
from serve_app.tools.bench.turns import SERVE_REQUESTS, _scrape, settled, words
from serve_app.tools.load import Call, Result, chat_call, closed_loop, send_one

if TYPE_CHECKING:
    from serve_app.config import AppConfig, ModelConfig

ADAPTER_REQUESTS = "ray_mistral_serve_adapter_requests_total"
LOAD_SECONDS_SUM = "ray_mistral_serve_adapter_load_seconds_sum"
LOAD_SECONDS_COUNT = "ray_mistral_serve_adapter_load_seconds_count"
LOAD_SECONDS_BUCKET = "ray_mistral_serve_adapter_load_seconds_bucket"
LOAD_BUCKET = "load_le_"  # the kinds of the load-time buckets: load_le_<bound>
OUTCOMES = ("held", "loaded", "failed")  # of a request for an adapter, at its replica
# What turns._scrape reads here: Serve's requests, ours by outcome, and the load times.
ADAPTER_METRICS = {
    SERVE_REQUESTS: "requests",
    ADAPTER_REQUESTS: "{outcome}",
    LOAD_SECONDS_SUM: "load_seconds",
    LOAD_SECONDS_COUNT: "loads",
    LOAD_SECONDS_BUCKET: LOAD_BUCKET + "{le}",
}
Counts = Mapping[str, Mapping[str, float]]  # kind -> replica -> count


def with_per_replica(config: AppConfig, model: ModelConfig, per_replica: int) -> AppConfig:
    """The app serving `model` alone, each replica holding at most `per_replica` adapters."""
    from pydantic import ValidationError

    from serve_app.config.model import LoraOptions

    lora = model.lora_options
    if lora is None:
        raise BenchError(
            f"model '{model.id}' serves no LoRA adapters (no `adapters` or `lora` in its config)"
        )
    try:
        changed = LoraOptions.model_validate({**lora.model_dump(), "max_adapters_per_replica": per_replica})
    except ValidationError as exc:
        raise BenchError(f"--per-replica {per_replica}: {exc.errors()[0]['msg']}") from None
    return config.model_copy(update={"models": (model.model_copy(update={"lora": changed}),)})


def chosen_adapters(model: ModelConfig, count: int | None) -> list[str]:
    """The names of the model's first `count` adapters (all without a count)."""
    names = [a.name for a in model.adapters]  # not their aliases: one name per adapter
    if not names:
        raise BenchError(f"model '{model.id}' lists no adapters")
    if count is not None and count > len(names):
        raise BenchError(f"--adapters {count}: model '{model.id}' lists {len(names)}")
    return names[:count]


def mixed_models(names: Sequence[str], requests: int, seed: int) -> list[str]:
    """The adapter each request of the mixed load names: uniform over `names`, seeded."""
    rng = random.Random(f"{seed}/mixed")
    return [rng.choice(names) for _ in range(requests)]


# --- the loads ---------------------------------------------------------------------------


def traffic(
    url: str, models: Sequence[str], concurrency: int, prompt_words: int, output_tokens: int, seed: str
) -> tuple[list[Result], float]:
    """One streamed chat per entry of `models` (its `model`), `concurrency` at a time in a
    closed loop, each a new question of `prompt_words` words and `output_tokens` out; each
    result's kind is its model."""
    rng = random.Random(seed)
    pending = iter(models)

    def next_call() -> Call | None:
        name = next(pending, None)
        if name is None:
            return None
        content = words(rng, prompt_words)
        return chat_call(name, content, output_tokens, kind=name, temperature=0, ignore_eos=True)

    return asyncio.run(closed_loop(url, next_call, concurrency))


@dataclass(frozen=True)
class FirstPair:
    """An adapter's first request (no replica held it) and the one after it."""

    adapter: str
    first: Result
    second: Result


def first_requests(
    url: str, names: Sequence[str], prompt_words: int, output_tokens: int, seed: int
) -> list[FirstPair]:
    """For each adapter in turn, two requests one after the other."""
    rng = random.Random(f"{seed}/first")

    def one(name: str, kind: str) -> Result:
        call = chat_call(
            name, words(rng, prompt_words), output_tokens, kind=kind, temperature=0, ignore_eos=True
        )
        return send_one(url, call)

    return [FirstPair(name, one(name, "first"), one(name, "second")) for name in names]


# --- figures -------------------------------------------------------------------------------


def held_share(by_outcome: Mapping[str, float]) -> float | None:
    """held / (held + loaded + failed); None without a request for an adapter."""
    total = sum(by_outcome.get(o, 0.0) for o in OUTCOMES)
    return round(by_outcome.get("held", 0.0) / total, 4) if total else None


def outcomes(counts: Counts) -> dict[str, Any]:
    """Adapter requests by outcome, their held share, and the same per replica (with the
    requests Serve counted there, which leave out those it saw cancelled), from the counts of
    one load."""
    replicas = sorted({r for kind in ("requests", *OUTCOMES) for r, v in counts.get(kind, {}).items() if v})
    per_replica: dict[str, dict[str, Any]] = {}
    for replica in replicas:
        mine = {o: int(counts.get(o, {}).get(replica, 0)) for o in OUTCOMES}
        per_replica[replica] = {
            "serve_requests": int(counts.get("requests", {}).get(replica, 0)),
            **mine,
            "held_share": held_share(mine),
        }
    total = {o: int(sum(counts.get(o, {}).values())) for o in OUTCOMES}
    return {**total, "held_share": held_share(total), "per_replica": per_replica}


def loads(counts: Counts) -> dict[str, Any]:
    """The adapter loads of one load, their mean time (seconds), and how many took at most each
    bucket's bound (Prometheus' cumulative buckets). Ray exports a histogram's sum as if each
    observation were its bucket's midpoint: the mean is that approximation, the buckets exact."""
    count = sum(counts.get("loads", {}).values())
    seconds = sum(counts.get("load_seconds", {}).values())
    bounds = sorted((k[len(LOAD_BUCKET) :] for k in counts if k.startswith(LOAD_BUCKET)), key=float)
    return {
        "loads": int(count),
        "load_seconds_mean": round(seconds / count, 4) if count else None,
        "load_seconds_buckets": {b: int(sum(counts[LOAD_BUCKET + b].values())) for b in bounds}
        if count
        else {},
    }


def first_figures(pairs: Sequence[FirstPair], counts: Counts) -> dict[str, Any]:
    """Time to first token of each adapter's first and second request, what the first added,
    and the replicas' load times."""
    times: dict[str, list[float]] = {"first": [], "second": [], "added": []}
    rows, errors = [], 0
    for pair in pairs:
        first, second = (r.ttft_s if r.complete else None for r in (pair.first, pair.second))
        added = first - second if first is not None and second is not None else None
        for key, value in (("first", first), ("second", second), ("added", added)):
            if value is not None:
                times[key].append(value)
        failed = [r.error for r in (pair.first, pair.second) if r.error is not None]
        errors += len(failed)
        rows.append(
            {
                "adapter": pair.adapter,
                "first_ttft_ms": ms(first),
                "second_ttft_ms": ms(second),
                "added_ms": ms(added),
                "errors": failed,
            }
        )
    return {
        **{f"{key}_ttft_p50_ms": ms(percentile(values, 50)) for key, values in times.items()},
        "errors": errors,
        **loads(counts),
        "adapter_requests": outcomes(counts),
        "adapters": rows,
    }


def load_figures(
    results: Sequence[Result], wall_s: float, concurrency: int, counts: Counts
) -> dict[str, Any]:
    """The bench's usual figures of a load (report.summarize), with the adapters' side."""
    ok = [r for r in results if r.complete]
    summary = summarize(results, wall_s, concurrency)
    del summary["prompt_tokens"]  # every prompt differs: the mean says more
    return {
        **summary,
        "prompt_tokens_mean": round(sum(r.prompt_tokens or 0 for r in ok) / len(ok), 1) if ok else None,
        **loads(counts),
        "adapter_requests": outcomes(counts),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summary(run: Mapping[str, Any]) -> dict[str, Any]:
    """One setting's headline figures."""
    first, base, mixed = run["first"], run["base"], run["mixed"]
    return {
        "held_share": mixed["adapter_requests"]["held_share"],
        "held_share_per_replica": [
            r["held_share"] for r in mixed["adapter_requests"]["per_replica"].values()
        ],
        "failed_requests": mixed["errors"],
        "failed_loads": mixed["adapter_requests"]["failed"],
        "first_ttft_p50_ms": first["first_ttft_p50_ms"],
        "second_ttft_p50_ms": first["second_ttft_p50_ms"],
        "added_ttft_p50_ms": first["added_ttft_p50_ms"],
        "load_seconds_mean_first": first["load_seconds_mean"],
        "load_seconds_mean_mixed": mixed["load_seconds_mean"],
        "loads_mixed": mixed["loads"],
        "base_output_tok_s": base["output_tok_s"],
        "mixed_output_tok_s": mixed["output_tok_s"],
        "mixed_base_tok_s_ratio": _ratio(mixed["output_tok_s"], base["output_tok_s"]),
        "base_ttft_p50_ms": base["ttft_p50_ms"],
        "mixed_ttft_p50_ms": mixed["ttft_p50_ms"],
    }


def _lines(label: str, run: Mapping[str, Any]) -> list[str]:
    first = run["first"]
    added = first["added_ttft_p50_ms"]
    out = [
        f"  {label} first   TTFT p50 {first['first_ttft_p50_ms']} ms, then {first['second_ttft_p50_ms']} ms"
        f" ({'?' if added is None else f'{added:+}'} ms); {first['loads']} loads,"
        f" ~{first['load_seconds_mean']} s mean; {first['errors']} err"
    ]
    for phase in ("base", "mixed"):
        f = run[phase]
        adapters = f["adapter_requests"]
        line = (
            f"  {label} {phase:<7} {f['requests']:>4} req {f['errors']:>3} err  {f['output_tok_s']} tok/s"
            f"  TTFT p50 {f['ttft_p50_ms']} ms  per replica"
            f" {[r['serve_requests'] for r in adapters['per_replica'].values()]}"
        )
        if phase == "mixed":
            shares = [r["held_share"] for r in adapters["per_replica"].values()]
            line += (
                f"  held {adapters['held_share']} {shares}  loaded {adapters['loaded']}"
                f" failed {adapters['failed']}  load ~{f['load_seconds_mean']} s mean"
            )
        out.append(line)
    return out


# --- the run -------------------------------------------------------------------------------


def run_setting(
    app_config: AppConfig, model: ModelConfig, names: Sequence[str], args: argparse.Namespace, label: str
) -> dict[str, Any]:
    app = OurApp(app_config, free_port(), args.start_timeout_s, args.front)
    print(f"[{label}] starting {model.id} ({model.deployment.num_replicas} replicas)...", flush=True)
    started = time.monotonic()
    try:
        url = app.start()
        print(f"[{label}] ready in {time.monotonic() - started:.0f} s", flush=True)
        # Warm-up: every replica compiles and allocates before anything is measured.
        c = args.concurrency
        warm, _ = traffic(url, [model.id] * (4 * c), c, 16, 4, f"{args.seed}/warm-up")
        if failed := [r.error for r in warm if r.error is not None]:
            print(f"  warm-up: {len(failed)} of {len(warm)} requests failed, first: {failed[0]}", flush=True)
        record: dict[str, Any] = {}

        before = _scrape(model, ADAPTER_METRICS)
        pairs = first_requests(url, names[: args.first], 16, args.first_output_tokens, args.seed)
        counts = settled(model, 2 * len(pairs), before, ADAPTER_METRICS, until=OUTCOMES)
        record["first"] = first_figures(pairs, counts)

        loads_of = {
            "base": [model.id] * args.requests,
            "mixed": mixed_models(names, args.requests, args.seed),
        }
        for phase, models in loads_of.items():
            before = _scrape(model, ADAPTER_METRICS)
            results, wall = traffic(
                url, models, c, args.prompt_words, args.output_tokens, f"{args.seed}/{phase}"
            )
            # Every adapter request counts once at its replica; Serve's own counter leaves out
            # those it saw cancelled, and lags.
            until = OUTCOMES if phase == "mixed" else ("requests",)
            counts = settled(model, len(results), before, ADAPTER_METRICS, until)
            record[phase] = load_figures(results, wall, c, counts)
        for line in _lines(label, record):
            print(line, flush=True)
        return record
    finally:
        print(f"[{label}] stopping...", flush=True)
        app.stop()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.tools.bench.adapters",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    parser.add_argument(
        "config", type=Path, help="app config (YAML); its model's replicas, adapters and `lora` are used"
    )
    parser.add_argument("--model", help="the model's id (default: the config's first)")
    parser.add_argument(
        "--per-replica",
        type=_int_list,
        default=[2, 4],
        help="comma-separated max_adapters_per_replica values, one deployment each (default: 2,4)",
    )
    parser.add_argument("--adapters", type=int, help="use the config's first N adapters (default: all)")
    parser.add_argument("--first", type=int, default=3, help="adapters whose first request is timed")
    parser.add_argument("--first-output-tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=192, help="of the base load, and of the mixed load")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prompt-words", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout-s", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("bench"))
    add_front_option(parser)
    args = parser.parse_args(argv)
    for name in ("adapters", "first", "first_output_tokens", "requests", "concurrency", "prompt_words"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.output_tokens < 1:
        parser.error("--output-tokens must be at least 1")
    if args.adapters is not None and args.first > args.adapters:
        parser.error("--first cannot be more than --adapters")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from serve_app.config import ConfigError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config, model = load_bench_model(args.config, args.model)
        names = chosen_adapters(model, args.adapters)
        if args.first > len(names):
            raise BenchError(f"--first {args.first}: model '{model.id}' lists {len(names)} adapters")
        settings = {n: with_per_replica(config, model, n) for n in args.per_replica}
    except (ConfigError, BenchError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # counters read within seconds
    runs: dict[str, dict[str, Any]] = {}
    try:
        for per_replica, app_config in settings.items():
            runs[str(per_replica)] = run_setting(app_config, model, names, args, f"per replica {per_replica}")
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    lora = model.lora_options
    report = {
        "kind": "adapters",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": str(args.config),
        "model": model.id,
        "replicas": model.deployment.num_replicas,
        "ingress_replicas": config.ingress.num_replicas,
        "max_loras": lora.max_loras if lora is not None else None,
        "adapters": names,
        "conditions": {k: v for k, v in vars(args).items() if k not in ("config", "out")},
        "runs": runs,  # by max_adapters_per_replica
        "summary": {n: summary(run) for n, run in runs.items()},
    }
    save_report(args.out, report, "summary")
    return 0


if __name__ == "__main__":
    sys.exit(main())
