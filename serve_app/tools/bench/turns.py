"""The multi-turn benchmark of cache-aware routing: conversations whose context grows at each
turn, served under each routing, against load-only routing.

    python -m serve_app.tools.bench.turns CONFIG [--model ID] [--routings prefix,load]
        [--conversations 24] [--turns 8] [--concurrency 8] [--system-words 1024]
        [--user-words 64] [--output-tokens 128] [--single-requests 480]
        [--single-concurrency 16] [--single-words 128] [--single-output-tokens 64] [--seed 0]
        [--front haproxy] [--out bench/]

For each routing of `--routings`, in order, the app serves the model of CONFIG (the first, or
`--model`) with that `routing` and with vLLM's `enable_prompt_tokens_details` (each answer then
says how many of its prompt tokens the prefix cache held), with the replicas and ingress
replicas that CONFIG gives, on a private Ray and a free loopback port. Two loads run on it:
1. multi-turn: `--conversations` chats of `--turns` turns each, `--concurrency` at a time, all
   opening with one system prompt of `--system-words` words; each turn asks `--user-words` new
   words, and the next turn carries the answer (`--output-tokens`, ignore_eos) and asks again;
2. single-turn: `--single-requests` chats of one new question each (`--single-words` words,
   different every time, `--single-output-tokens` out), `--single-concurrency` streams in a
   closed loop: many independent conversations.
Every request carries its conversation's id as `X-Session-Id` (each single-turn request one of
its own), which only `session` routing reads.
Each load reports the prefix-cache hit rate (from the answers, and from the engines' own
counters), time to first token per turn, output tokens/s, and the requests each replica took
(Serve's per-replica request counter, read from Ray's metrics endpoint). Prints a comparison
with the last routing (`load` by default) and writes `turns-<UTC time>.json` to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve_app.local.front import add_front_option
from serve_app.local.launcher import free_port
from serve_app.tools.bench.driver import machine
from serve_app.tools.bench.report import ms, percentile, save_report, summarize
from serve_app.tools.bench.targets import APP, BenchError, OurApp, load_bench_model
from serve_app.tools.load import CHAT, Call, Result, closed_loop, send

if TYPE_CHECKING:
    from serve_app.config import AppConfig, ModelConfig

# Plain English words, about one token each in Mistral's tokenizers.
_PLAIN = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force"
)
WORDS = tuple(_PLAIN.split())
SERVE_REQUESTS = "ray_serve_deployment_request_counter_total"
PREFIX_QUERIES = "ray_mistral_serve_prefix_cache_queries_total"
PREFIX_HITS = "ray_mistral_serve_prefix_cache_hits_total"
METRICS_SETTLE_S = 20.0  # Ray exports each process's metrics every second (set below)


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choices(WORDS, k=count))


def with_routing(config: AppConfig, model: ModelConfig, routing: str) -> AppConfig:
    """The app serving `model` alone, routed by `routing`, its answers telling cached tokens."""
    update: dict[str, Any] = {"routing": routing}
    if model.engine == "vllm":
        update["server_args"] = {**model.server_args, "enable_prompt_tokens_details": True}
    else:
        update["engine_args"] = {**model.engine_args, "enable_prompt_tokens_details": True}
    return config.model_copy(update={"models": (model.model_copy(update=update),)})


# --- the loads ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Turns:
    """The multi-turn load's shape."""

    model: str
    conversations: int
    turns: int
    concurrency: int
    system_words: int
    user_words: int
    output_tokens: int
    seed: int


def _chat(model: str, messages: list[dict[str, str]], output_tokens: int, kind: str, session: str) -> Call:
    from serve_app.serving.routing import SESSION_HEADER  # imports Ray Serve: not on import of this module

    body = {
        "model": model,
        "messages": messages,
        "max_tokens": output_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return Call(CHAT, body, kind=kind, keep_text=True, headers=((SESSION_HEADER, session),))


async def conversations(url: str, shape: Turns) -> tuple[list[Result], float]:
    """Run the multi-turn load; each result's `kind` is its turn (1-based)."""
    import aiohttp

    rng = random.Random(shape.seed)
    system = {"role": "system", "content": words(rng, shape.system_words)}
    openings = [words(rng, shape.user_words) for _ in range(shape.conversations)]
    pending = iter(range(shape.conversations))
    results: list[Result] = []

    async def talk(session: aiohttp.ClientSession, index: int, t0: float) -> None:
        own = random.Random(f"{shape.seed}/{index}")
        messages = [system, {"role": "user", "content": openings[index]}]
        for turn in range(1, shape.turns + 1):
            call = _chat(shape.model, messages, shape.output_tokens, str(turn), f"conversation-{index}")
            result = await send(session, url, call, t0)
            results.append(result)
            if not result.complete:
                return  # the conversation cannot go on without its answer
            messages = [
                *messages,
                {"role": "assistant", "content": result.text},
                {"role": "user", "content": words(own, shape.user_words)},
            ]

    async def client(session: aiohttp.ClientSession, t0: float) -> None:
        for index in pending:
            await talk(session, index, t0)

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600)
    connector = aiohttp.TCPConnector(limit=shape.concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(session, t0) for _ in range(shape.concurrency)))
        return results, time.perf_counter() - t0


def single_turn(
    url: str, model: str, requests: int, concurrency: int, prompt_words: int, output_tokens: int, seed: int
) -> tuple[list[Result], float]:
    """Many independent one-turn chats, each with a question of its own."""
    rng = random.Random(f"{seed}/single")
    sent = itertools.count()

    def next_call() -> Call:
        messages = [{"role": "user", "content": words(rng, prompt_words)}]
        return _chat(model, messages, output_tokens, "1", f"single-{next(sent)}")

    return asyncio.run(closed_loop(url, next_call, concurrency, requests=requests))


# --- what the replicas say -----------------------------------------------------------------


# The samples `_scrape` reads by default, and the kind each is counted under.
ROUTING_METRICS = {SERVE_REQUESTS: "requests", PREFIX_QUERIES: "queries", PREFIX_HITS: "hits"}


def _kind_of(name: str, labels: dict[str, str], model: ModelConfig, wanted: Mapping[str, str]) -> str | None:
    """The kind a sample counts under (`wanted[name]`, its `{label}`s filled from the sample's
    labels), or None if it is not one of `model`'s replicas'. Serve's own counter ("requests")
    is known by application and deployment, ours by the model label."""
    kind = wanted.get(name)
    if kind is None or "replica" not in labels:
        return None
    if kind == "requests":
        serves = labels.get("application") == APP and labels.get("deployment") == model.deployment_name
        return kind if serves else None
    return kind.format_map(labels) if labels.get("model") == model.id else None


def _scrape(model: ModelConfig, wanted: Mapping[str, str] = ROUTING_METRICS) -> dict[str, dict[str, float]]:
    """Per kind of `wanted` (by default: the requests Serve counted, and the engine's prefix-cache
    counts), per replica of `model`: the samples' sum over Ray's metrics endpoints (each node's).
    Replicas are known by Serve's unique id. A kind naming labels (`{outcome}`) is there once
    a sample has it; the others always are."""
    import httpx
    import ray
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {kind: {} for kind in wanted.values() if "{" not in kind}
    for node in ray.nodes():
        if not node["Alive"]:
            continue
        url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
            for sample in family.samples:
                kind = _kind_of(sample.name, sample.labels, model, wanted)
                if kind is not None:
                    by_replica = out.setdefault(kind, {})
                    replica = sample.labels["replica"]
                    by_replica[replica] = by_replica.get(replica, 0.0) + sample.value
    return out


def _since(
    now: dict[str, dict[str, float]], before: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    return {
        kind: {r: v - before.get(kind, {}).get(r, 0.0) for r, v in by.items()} for kind, by in now.items()
    }


def settled(
    model: ModelConfig,
    expected_requests: int,
    before: dict[str, dict[str, float]],
    wanted: Mapping[str, str] = ROUTING_METRICS,
    until: Sequence[str] = ("requests",),
) -> dict[str, Any]:
    """The counts since `before` (of `wanted`, as `_scrape` takes it) once Ray has exported
    every request, counted by the kinds `until` together (or METRICS_SETTLE_S passed)."""
    deadline = time.monotonic() + METRICS_SETTLE_S
    while _counted(_since(_scrape(model, wanted), before), until) < expected_requests:
        if time.monotonic() > deadline:
            print(f"  (Ray's metrics did not count all {expected_requests} requests in time)", flush=True)
            break
        time.sleep(1.0)
    time.sleep(2.0)  # the engines' counters follow their replicas' every second
    return _since(_scrape(model, wanted), before)


def _counted(counts: dict[str, dict[str, float]], kinds: Sequence[str]) -> float:
    return sum(v for kind in kinds for v in counts.get(kind, {}).values())


# --- figures -------------------------------------------------------------------------------


def _hit_rate(results: Sequence[Result]) -> float | None:
    counted = [r for r in results if r.complete and r.prompt_tokens and r.cached_tokens is not None]
    prompt = sum(r.prompt_tokens or 0 for r in counted)
    return round(sum(r.cached_tokens or 0 for r in counted) / prompt, 4) if prompt else None


def figures(
    results: Sequence[Result], wall_s: float, concurrency: int, counts: dict[str, Any], turns: int
) -> dict[str, Any]:
    """The bench's usual figures of a load (report.summarize), and the routing's: hit rates,
    TTFT per turn, and the requests each replica took."""
    ok = [r for r in results if r.complete]
    by_turn: dict[str, list[float]] = {}
    for r in ok:
        if r.ttft_s is not None:
            by_turn.setdefault(r.kind, []).append(r.ttft_s)
    later = [t for kind, values in by_turn.items() if int(kind) >= 2 for t in values]
    per_replica = {r: int(v) for r, v in sorted(counts["requests"].items()) if v}
    queries, hits = sum(counts["queries"].values()), sum(counts["hits"].values())
    summary = summarize(results, wall_s, concurrency)
    del summary["prompt_tokens"]  # every turn's prompt is longer: the mean says more
    return {
        **summary,
        "prompt_tokens_mean": round(sum(r.prompt_tokens or 0 for r in ok) / len(ok), 1) if ok else None,
        "hit_rate": _hit_rate(ok),
        "hit_rate_by_turn": {t: _hit_rate([r for r in ok if r.kind == str(t)]) for t in range(1, turns + 1)},
        "hit_rate_engines": round(hits / queries, 4) if queries else None,
        "ttft_p50_ms_by_turn": {t: ms(percentile(by_turn.get(str(t), []), 50)) for t in range(1, turns + 1)},
        "ttft_p50_ms_turns_2_on": ms(percentile(later, 50)),
        "ttft_p95_ms_turns_2_on": ms(percentile(later, 95)),
        "requests_per_replica": per_replica,
        "max_min_per_replica": round(max(per_replica.values()) / min(per_replica.values()), 3)
        if len(per_replica) > 1
        else None,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def comparison(runs: dict[str, dict[str, Any]], baseline: str) -> dict[str, dict[str, Any]]:
    """Each routing against `baseline`: the issue's four figures."""
    base = runs[baseline]
    return {
        routing: {
            "hit_rate": run["turns"]["hit_rate"],
            "hit_rate_baseline": base["turns"]["hit_rate"],
            "ttft_p50_turns_2_on_ratio": _ratio(
                run["turns"]["ttft_p50_ms_turns_2_on"], base["turns"]["ttft_p50_ms_turns_2_on"]
            ),
            "max_min_per_replica_single_turn": run["single"]["max_min_per_replica"],
            "single_turn_throughput_ratio": _ratio(
                run["single"]["output_tok_s"], base["single"]["output_tok_s"]
            ),
        }
        for routing, run in runs.items()
        if routing != baseline
    }


def _line(routing: str, phase: str, f: dict[str, Any]) -> str:
    return (
        f"  {routing:<8} {phase:<7} {f['requests']:>5} req {f['errors']:>3} err  hit {f['hit_rate']}"
        f" (engines {f['hit_rate_engines']})  TTFT p50 {f['ttft_p50_ms']} ms"
        f" (turns>=2 {f['ttft_p50_ms_turns_2_on']})  {f['output_tok_s']} tok/s"
        f"  per replica {list(f['requests_per_replica'].values())}"
    )


# --- the run -------------------------------------------------------------------------------


def run_routing(
    config: AppConfig, model: ModelConfig, routing: str, args: argparse.Namespace
) -> dict[str, Any]:
    app = OurApp(with_routing(config, model, routing), free_port(), args.start_timeout_s, args.front)
    print(f"[{routing}] starting {model.id} ({model.deployment.num_replicas} replicas)...", flush=True)
    started = time.monotonic()
    try:
        url = app.start()
        print(f"[{routing}] ready in {time.monotonic() - started:.0f} s", flush=True)
        # Warm-up: every replica compiles and allocates before anything is measured.
        single_turn(url, model.id, 4 * args.concurrency, args.concurrency, 16, 4, args.seed + 1)
        record: dict[str, Any] = {}
        shape = Turns(
            model.id,
            args.conversations,
            args.turns,
            args.concurrency,
            args.system_words,
            args.user_words,
            args.output_tokens,
            args.seed,
        )
        # phase -> (its load, its streams, its turns)
        loads: dict[str, tuple[Callable[[], tuple[list[Result], float]], int, int]] = {
            "turns": (lambda: asyncio.run(conversations(url, shape)), args.concurrency, args.turns),
            "single": (
                lambda: single_turn(
                    url,
                    model.id,
                    args.single_requests,
                    args.single_concurrency,
                    args.single_words,
                    args.single_output_tokens,
                    args.seed,
                ),
                args.single_concurrency,
                1,
            ),
        }
        for phase, (load, streams, turns) in loads.items():
            before = _scrape(model)
            results, wall = load()
            counts = settled(model, len(results), before)
            record[phase] = figures(results, wall, streams, counts, turns)
            print(_line(routing, phase, record[phase]), flush=True)
        return record
    finally:
        print(f"[{routing}] stopping...", flush=True)
        app.stop()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.tools.bench.turns", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument(
        "config", type=Path, help="app config (YAML); its model's replicas and ingress replicas are used"
    )
    parser.add_argument("--model", help="the model's id (default: the config's first)")
    parser.add_argument("--routings", default="prefix,load", help="comma-separated; the last is the baseline")
    parser.add_argument("--conversations", type=int, default=24)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8, help="conversations at a time")
    parser.add_argument("--system-words", type=int, default=1024)
    parser.add_argument("--user-words", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--single-requests", type=int, default=480)
    parser.add_argument("--single-concurrency", type=int, default=16)
    parser.add_argument("--single-words", type=int, default=128)
    parser.add_argument("--single-output-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout-s", type=float, default=600.0)
    parser.add_argument("--out", type=Path, default=Path("bench"))
    add_front_option(parser)
    args = parser.parse_args(argv)
    for name in ("conversations", "turns", "concurrency", "single_requests", "single_concurrency"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    args.routings = [r.strip() for r in args.routings.split(",") if r.strip()]
    from serve_app.serving.routing import ROUTINGS

    if not args.routings or any(r not in ROUTINGS for r in args.routings):
        parser.error(f"--routings takes {', '.join(ROUTINGS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from serve_app.config import ConfigError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config, model = load_bench_model(args.config, args.model)
    except (ConfigError, BenchError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # counters read within seconds
    runs: dict[str, dict[str, Any]] = {}
    try:
        for routing in args.routings:
            runs[routing] = run_routing(config, model, routing, args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    baseline = args.routings[-1]
    report = {
        "kind": "turns",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": str(args.config),
        "model": model.id,
        "replicas": model.deployment.num_replicas,
        "ingress_replicas": config.ingress.num_replicas,
        "conditions": {k: v for k, v in vars(args).items() if k not in ("config", "out")},
        "runs": runs,
        "against": baseline,
        "comparison": comparison(runs, baseline),
    }
    save_report(args.out, report, "comparison")
    return 0


if __name__ == "__main__":
    sys.exit(main())
