"""The benchmark of offline batches: a large batch across the app's models, what it does to
interactive latency, whether its answers are those of the same requests sent one by one, and
whether it survives its ingress killed and the whole app restarted.

    python -m serve_app.tools.bench.batch [CONFIG] [--lines 2000] [--output-tokens 16]
        [--interactive 400] [--interactive-rate 1] [--interactive-output-tokens 32]
        [--restart-lines 400] [--batch-models MODEL...] [--rounds 8 | --rounds 1 --alone-again]
        [--seed 0] [--front haproxy] [--out bench/]

CONFIG (default configs/bench-cpu-batch.yaml) is served on a private Ray and a free loopback
port, its batch store in a new temporary directory. In order:
1. latency: `--rounds` R rounds of two blocks taken in turn (A B, B A, A B, ...), each block
   `--interactive`/R streamed chats, one every 1/`--interactive-rate` s whatever the answers
   (arrivals), alternating over the models, each a new question; alone (A), or beside a batch
   of `--lines` new chats (B: greedy, `--output-tokens` out, over the models or
   `--batch-models`) started with the block and cancelled at its end. The time to first token
   of all A blocks against all B blocks, also by model and by round: a host whose speed drifts
   over the run weighs on both alike. With `--rounds 1`: the chats alone, then the batch of 2
   started and the same chats beside it (and with `--alone-again` alone once more after it);
2. the batch: `--lines` chats (the same kind) to their end: lines/s, output tokens/s; with no
   interactive chats (with `--rounds 1`, it is 1's batch; with more rounds and
   `--latency-only`, it does not run);
3. exactly once: the output and error files hold each custom_id once, and all of them;
4. parity (not with `--latency-only`): every line sent alone (8 at a time, not streamed): its answer against the batch's;
5. restart (not with `--latency-only`): a batch of the first `--restart-lines` lines; once a tenth is answered, the ingress
   replica is SIGKILLed; once a third is, the whole app (Ray included) is stopped and started
   again on the same store; the batch then runs to its end: each line answered once, and as in 2.
Prints the figures and writes `batch-<UTC time>.json` to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serve_app.local.batch import FINAL, BatchClient, BatchCliError
from serve_app.local.front import add_front_option
from serve_app.local.launcher import free_port
from serve_app.local.processes import descendants
from serve_app.tools.bench.cpu import busiest, cpu_seconds
from serve_app.tools.bench.driver import machine
from serve_app.tools.bench.report import ms, percentile, save_report
from serve_app.tools.bench.targets import APP, BenchError, OurApp
from serve_app.tools.bench.turns import words
from serve_app.tools.load import Call, Result, chat_call, closed_loop, open_loop

if TYPE_CHECKING:
    from serve_app.config import AppConfig

DEFAULT_CONFIG = Path("configs/bench-cpu-batch.yaml")
CHAT = "/v1/chat/completions"
POLL_S = 0.5


def batch_lines(models: Sequence[str], count: int, output_tokens: int, seed: str) -> list[dict[str, Any]]:
    """`count` greedy chats over `models` in turn, each a question of its own."""
    rng = random.Random(seed)
    return [
        {
            "custom_id": f"line-{i}",
            "method": "POST",
            "url": CHAT,
            "body": {
                "model": models[i % len(models)],
                "messages": [{"role": "user", "content": words(rng, 24)}],
                "max_tokens": output_tokens,
                "temperature": 0,
            },
        }
        for i in range(count)
    ]


def interactive_calls(models: Sequence[str], count: int, output_tokens: int, seed: str) -> list[Call]:
    rng = random.Random(seed)
    return [
        chat_call(models[i % len(models)], words(rng, 32), output_tokens, kind="interactive", temperature=0)
        for i in range(count)
    ]


def ttft(results: Sequence[Result], wall_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.complete and r.ttft_s is not None]
    times = [r.ttft_s for r in ok if r.ttft_s is not None]
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "wall_s": round(wall_s, 2),
        "ttft_p50_ms": ms(percentile(times, 50)),
        "ttft_p95_ms": ms(percentile(times, 95)),
    }


def by_model(calls: Sequence[Call], results: Sequence[Result], wall_s: float) -> dict[str, Any]:
    """The TTFT figures of each model's calls (`results` in the order of `calls`)."""
    grouped: dict[str, list[Result]] = {}
    for call, result in zip(calls, results, strict=True):
        grouped.setdefault(call.body["model"], []).append(result)
    return {model: ttft(rs, wall_s) for model, rs in grouped.items()}


def arrivals(url: str, calls: list[Call], interval_s: float) -> tuple[list[Result], dict[str, Any]]:
    """The interactive arrivals' results, and their TTFT over all and by model, with the CPU
    each process of the app used meanwhile."""
    before = cpu_seconds(descendants())
    results, wall = asyncio.run(open_loop(url, calls, interval_s))
    figures = ttft(results, wall)
    figures["by_model"] = by_model(calls, results, wall)  # open_loop keeps the calls' order
    figures["cpu"] = busiest(before, cpu_seconds(descendants()), wall, 0, top=8)
    return results, figures


def interactive(url: str, calls: list[Call], interval_s: float) -> dict[str, Any]:
    return arrivals(url, calls, interval_s)[1]


# --- the batch -----------------------------------------------------------------------------


def submit(client: BatchClient, lines: list[dict[str, Any]], folder: Path, name: str) -> str:
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    uploaded = client.upload(path)
    return str(client.create(uploaded["id"], CHAT, {"bench": name})["id"])


def wait_for(
    get: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], bool], timeout_s: float
) -> dict[str, Any]:
    """Poll `get()` until `done` (through the errors of an app restarting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            batch = get()
            if done(batch):
                return batch
        except Exception as exc:  # the ingress or the app restarting
            batch = {"error": repr(exc)[:200]}
        if time.monotonic() > deadline:
            raise BenchError(f"the batch did not get there within {timeout_s:.0f} s: {batch}")
        time.sleep(POLL_S)


def answered(at_least: int) -> Callable[[dict[str, Any]], bool]:
    return lambda b: b["request_counts"]["completed"] + b["request_counts"]["failed"] >= at_least


def finished(batch: dict[str, Any]) -> bool:
    return batch.get("status") in FINAL


def outputs(client: BatchClient, batch: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    """Every output and error line of a finished batch."""
    lines: list[dict[str, Any]] = []
    for kind in ("output_file_id", "error_file_id"):
        if file_id := batch.get(kind):
            path = folder / f"{file_id}.jsonl"
            client.download(file_id, path)
            lines += [json.loads(x) for x in path.read_text().splitlines()]
    return lines


def exactly_once(lines: list[dict[str, Any]], sent: list[dict[str, Any]]) -> dict[str, Any]:
    """Lines lost, duplicated, unknown and failed, of a batch's outputs against its input."""
    counts = Counter(r["custom_id"] for r in lines)
    wanted = {s["custom_id"] for s in sent}
    return {
        "lines": len(sent),
        "answered": len(lines),
        "lost": len(wanted - set(counts)),
        "duplicated": sum(1 for c in counts.values() if c > 1),
        "unknown": len(set(counts) - wanted),
        "failed": sum(1 for r in lines if r.get("error") is not None),
    }


def answer_text(record: dict[str, Any]) -> str | None:
    body = (record.get("response") or {}).get("body") or {}
    try:
        return str(body["choices"][0]["message"]["content"])
    except (KeyError, IndexError, TypeError):
        return None


def parity(url: str, lines: list[dict[str, Any]], answers: dict[str, str | None]) -> dict[str, Any]:
    """Every line sent alone: how many answers equal the batch's."""
    pending = iter(lines)
    ids: list[str] = []

    def next_call() -> Call | None:
        line = next(pending, None)
        if line is None:
            return None
        ids.append(line["custom_id"])
        return Call(CHAT, line["body"], kind=line["custom_id"], keep_text=True)

    results, wall = asyncio.run(closed_loop(url, next_call, 8))
    same = sum(1 for r in results if r.complete and answers.get(r.kind) == r.text)
    differ = [r.kind for r in results if r.complete and answers.get(r.kind) != r.text]
    return {
        "lines": len(lines),
        "identical": same,
        "different": len(differ),
        "different_ids": differ[:10],
        "errors": sum(1 for r in results if not r.complete),
        "wall_s": round(wall, 1),
    }


# --- the phases ----------------------------------------------------------------------------


def kill_ingress() -> int:
    """SIGKILL the process of the benchmark app's ingress replica (Ray titles it
    `ray::ServeReplica:<app>:OpenAIIngress`); its pid."""
    import psutil

    title = f"ServeReplica:{APP}:OpenAIIngress"
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if title in " ".join(proc.info["cmdline"] or []):
            os.kill(proc.info["pid"], signal.SIGKILL)
            return int(proc.info["pid"])
    raise BenchError(f"no process titled {title} to kill")


ALONE, BUSY = "alone", "with_batch"


def beside_a_batch(
    url: str,
    client: BatchClient,
    calls: list[Call],
    interval_s: float,
    lines: list[dict[str, Any]],
    folder: Path,
    name: str,
) -> tuple[list[Result], dict[str, Any]]:
    """`calls` while a batch of `lines` runs; then the batch cancelled and waited for until it
    stopped, its outputs checked (no line answered twice, none unknown)."""
    batch_id = submit(client, lines, folder, name)
    results, figures = arrivals(url, calls, interval_s)
    batch = client.get(batch_id)
    ran_out = finished(batch)  # the block then measured the app partly alone: more --lines
    if not ran_out:
        try:
            client.cancel(batch_id)
        except BatchCliError as exc:  # 400 if it finished in between; anything else shows below
            print(f"  cancelling {batch_id}: {exc}", flush=True)
        batch = wait_for(lambda: client.get(batch_id), finished, 300)
    once = exactly_once(outputs(client, batch, folder), lines)
    figures["batch"] = {
        "id": batch_id,
        "status": batch["status"],
        "ended_before_the_block": ran_out,
        **{k: once[k] for k in ("answered", "duplicated", "unknown", "failed")},
    }
    if ran_out:
        print(f"  warning: batch {batch_id} ended before its block did: raise --lines", flush=True)
    return results, figures


def latency_rounds(
    url: str, client: BatchClient, models: list[str], args: argparse.Namespace, folder: Path
) -> dict[str, Any]:
    """`--rounds` R: the interactive arrivals in 2R blocks, alone and beside a batch in turn (A B,
    B A, A B, ...: both conditions at the same mean time of the run), so that a host whose speed
    drifts weighs on both alike. Every block asks questions of its own; each batch block starts
    a batch of `--lines` new lines and cancels it at its end."""
    per_block = args.interactive // args.rounds
    interval = 1 / args.interactive_rate
    calls_of: dict[str, list[Call]] = {ALONE: [], BUSY: []}
    results_of: dict[str, list[Result]] = {ALONE: [], BUSY: []}
    wall_of = {ALONE: 0.0, BUSY: 0.0}
    blocks: list[dict[str, Any]] = []
    for r in range(1, args.rounds + 1):
        for kind in (ALONE, BUSY) if r % 2 else (BUSY, ALONE):
            seed = f"{args.seed}/round-{r}"
            calls = interactive_calls(models, per_block, args.interactive_output_tokens, f"{seed}/{kind}")
            print(f"round {r}/{args.rounds}, {kind}: {per_block} interactive chats...", flush=True)
            if kind == ALONE:
                results, figures = arrivals(url, calls, interval)
            else:
                lines = batch_lines(
                    args.batch_models or models, args.lines, args.output_tokens, f"{seed}/batch"
                )
                results, figures = beside_a_batch(url, client, calls, interval, lines, folder, f"round-{r}")
            print(f"  {ttft(results, figures['wall_s'])}", flush=True)
            blocks.append({"round": r, "kind": kind, **figures})
            calls_of[kind] += calls
            results_of[kind] += results
            wall_of[kind] += figures["wall_s"]
    record: dict[str, Any] = {
        kind: {
            **ttft(results_of[kind], wall_of[kind]),
            "by_model": by_model(calls_of[kind], results_of[kind], wall_of[kind]),
        }
        for kind in (ALONE, BUSY)
    }
    record[BUSY]["batch_lines_answered_meanwhile"] = sum(
        b["batch"]["answered"] for b in blocks if "batch" in b
    )
    for kind in (ALONE, BUSY):
        print(f"{kind}, all rounds: {ttft(results_of[kind], wall_of[kind])}", flush=True)
    record["blocks"] = blocks
    return record


def latency_once(
    url: str,
    client: BatchClient,
    calls: list[Call],
    interval_s: float,
    lines: list[dict[str, Any]],
    folder: Path,
    record: dict[str, Any],
) -> tuple[str, float]:
    """`calls` alone, then the batch of `lines` started and `calls` again beside it (their
    figures into `record`); the batch's id and when it started."""
    print(f"alone: {len(calls)} interactive chats, one every {interval_s:.2f} s...", flush=True)
    record[ALONE] = interactive(url, calls, interval_s)
    print(f"  {record[ALONE]}", flush=True)
    started = time.monotonic()
    batch_id = submit(client, lines, folder, "batch")
    print(f"with a batch of {len(lines)} lines ({batch_id}): the same interactive chats...", flush=True)
    record[BUSY] = interactive(url, calls, interval_s)
    during = client.get(batch_id)
    record[BUSY]["batch_lines_answered_meanwhile"] = (
        during["request_counts"]["completed"] + during["request_counts"]["failed"]
    )
    print(f"  {record[BUSY]}", flush=True)
    return batch_id, started


def to_its_end(
    client: BatchClient,
    batch_id: str,
    lines: list[dict[str, Any]],
    started: float,
    folder: Path,
    timeout_s: float,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Wait for a batch to finish: its figures from `started` (lines/s, tokens/s, exactly once),
    and its output and error lines."""
    batch = wait_for(lambda: client.get(batch_id), finished, timeout_s)
    wall = time.monotonic() - started
    out = outputs(client, batch, folder)
    tokens = (batch.get("usage") or {}).get("output_tokens") or 0
    figures = {
        "status": batch["status"],
        "request_counts": batch["request_counts"],
        "wall_s": round(wall, 1),
        "lines_s": round(len(lines) / wall, 2),
        "output_tokens": tokens,
        "output_tok_s": round(tokens / wall, 1),
        **exactly_once(out, lines),
    }
    return figures, out


def start(config: AppConfig, args: argparse.Namespace, port: int) -> tuple[OurApp, str]:
    app = OurApp(config, port, args.start_timeout_s, args.front)
    began = time.monotonic()
    url = app.start()
    print(f"  app ready in {time.monotonic() - began:.0f} s on {url}", flush=True)
    return app, url


def measure(config: AppConfig, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    models = [m.id for m in config.models]
    if unknown := set(args.batch_models or ()) - set(models):
        raise BenchError(f"--batch-models: not in the config: {', '.join(sorted(unknown))}")
    port = free_port()
    print(f"starting {', '.join(models)} (batch store {config.batches.store})...", flush=True)
    app, url = start(config, args, port)
    client = BatchClient(url, None)
    record: dict[str, Any] = {}
    try:
        warm = interactive_calls(models, 8, 8, f"{args.seed}/warm")
        asyncio.run(open_loop(url, warm, 0.1))
        interval = 1 / args.interactive_rate
        lines = batch_lines(args.batch_models or models, args.lines, args.output_tokens, f"{args.seed}/batch")
        calls = interactive_calls(
            models, args.interactive, args.interactive_output_tokens, f"{args.seed}/chat"
        )
        if args.rounds > 1:
            record.update(latency_rounds(url, client, models, args, folder))
            if args.latency_only:
                return record
            started = time.monotonic()
            batch_id = submit(client, lines, folder, "batch")
            print(f"the batch of {len(lines)} lines ({batch_id}), no interactive chats...", flush=True)
        else:
            batch_id, started = latency_once(url, client, calls, interval, lines, folder, record)
        record["batch"], out = to_its_end(client, batch_id, lines, started, folder, args.batch_timeout_s)
        print(f"  batch: {record['batch']}", flush=True)
        if args.alone_again:  # the host's drift over the run shows as the two alone phases' difference
            print(f"alone again: the same {len(calls)} interactive chats...", flush=True)
            record["alone_again"] = interactive(url, calls, interval)
            print(f"  {record['alone_again']}", flush=True)
        if args.latency_only:
            return record
        answers = {r["custom_id"]: answer_text(r) for r in out}
        print(f"parity: {len(lines)} lines sent one by one...", flush=True)
        record["parity"] = parity(url, lines, answers)
        print(f"  {record['parity']}", flush=True)

        restart_lines = lines[: args.restart_lines]
        restart_id = submit(client, restart_lines, folder, "restart")
        print(f"restart: a batch of {len(restart_lines)} lines ({restart_id})...", flush=True)
        wait_for(lambda: client.get(restart_id), answered(len(restart_lines) // 10), args.batch_timeout_s)
        killed = kill_ingress()
        print(f"  ingress replica (pid {killed}) SIGKILLed", flush=True)
        at_stop = wait_for(
            lambda: client.get(restart_id), answered(len(restart_lines) // 3), args.batch_timeout_s
        )
        print(f"  {at_stop['request_counts']}: stopping the whole app...", flush=True)
        client.close()
        app.stop()
        app, url = start(config, args, port)
        client = BatchClient(url, None)
        restarted = wait_for(lambda: client.get(restart_id), finished, args.batch_timeout_s)
        again = outputs(client, restarted, folder)
        record["restart"] = {
            "status": restarted["status"],
            "request_counts": restarted["request_counts"],
            "answered_at_stop": at_stop["request_counts"],
            **exactly_once(again, restart_lines),
            "same_answers_as_the_first_batch": sum(
                1
                for r in again
                if answer_text(r) is not None and answer_text(r) == answers.get(r["custom_id"])
            ),
        }
        print(f"  {record['restart']}", flush=True)
        return record
    finally:
        client.close()
        app.stop()


def _against_both(record: dict[str, Any], busy: float | None) -> dict[str, Any]:
    """With `--alone-again`: the TTFT p95 with a batch against the mean of both alone phases."""
    if "alone_again" not in record:
        return {}
    both = [record["alone"]["ttft_p95_ms"], record["alone_again"]["ttft_p95_ms"]]
    mean = sum(both) / 2 if all(both) else None
    return {
        "ttft_p95_ms_alone_again": both[1],
        "ttft_p95_rise_against_both": round(busy / mean - 1, 4) if mean and busy else None,
    }


def _by_round(record: dict[str, Any]) -> dict[str, Any]:
    """With `--rounds`: each round's TTFT p95 rise (its batch block against its alone block)."""
    if "blocks" not in record:
        return {}
    p95: dict[tuple[int, str], float | None] = {
        (b["round"], b["kind"]): b["ttft_p95_ms"] for b in record["blocks"]
    }
    rises = []
    for r in sorted({r for r, _ in p95}):
        alone, busy = p95.get((r, ALONE)), p95.get((r, BUSY))
        rises.append(round(busy / alone - 1, 4) if alone and busy else None)
    return {"ttft_p95_rise_by_round": rises}


def summary(record: dict[str, Any]) -> dict[str, Any]:
    alone, busy = record["alone"]["ttft_p95_ms"], record["with_batch"]["ttft_p95_ms"]
    latency = {
        "ttft_p95_ms_alone": alone,
        "ttft_p95_ms_with_batch": busy,
        "ttft_p95_rise": round(busy / alone - 1, 4) if alone and busy else None,
        **_against_both(record, busy),
        **_by_round(record),
        **(
            {
                "batch_lines_s": record["batch"]["lines_s"],
                "batch_output_tok_s": record["batch"]["output_tok_s"],
            }
            if "batch" in record
            else {}
        ),
    }
    if "restart" not in record:
        return latency
    return {
        **latency,
        "lost": record["batch"]["lost"] + record["restart"]["lost"],
        "duplicated": record["batch"]["duplicated"] + record["restart"]["duplicated"],
        "parity": f"{record['parity']['identical']}/{record['parity']['lines']}",
        "restart": f"{record['restart']['status']}, {record['restart']['answered']}/{record['restart']['lines']} lines",
    }


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.tools.bench.batch", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("config", type=Path, nargs="?", default=DEFAULT_CONFIG, help="app config (YAML)")
    parser.add_argument("--lines", type=int, default=2000, help="requests in the batch")
    parser.add_argument("--output-tokens", type=int, default=16, help="of each batch request")
    parser.add_argument(
        "--interactive", type=int, default=400, help="interactive chats alone, and as many beside a batch"
    )
    parser.add_argument("--interactive-rate", type=float, default=1.0, help="interactive chats per second")
    parser.add_argument("--interactive-output-tokens", type=int, default=32)
    parser.add_argument("--restart-lines", type=int, default=400, help="of the batch restarted mid-way")
    parser.add_argument(
        "--batch-models",
        nargs="+",
        metavar="MODEL",
        help="the models of the batch's lines (default: all); interactive chats still go to all, "
        "so that their TTFT by model tells the batch's own model from the others",
    )
    parser.add_argument(
        "--latency-only", action="store_true", help="phases 1 and 2 only (no parity, no restart)"
    )
    parser.add_argument(
        "--alone-again",
        action="store_true",
        help="after the batch, the interactive chats alone once more: the rise is then also "
        "taken against the mean of both alone phases (a host whose speed drifts)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=8,
        help="the interactive chats in this many rounds of two blocks, alone and beside a batch of "
        "--lines new lines (cancelled at the block's end), in turn A B, B A, ...: a host's drift "
        "then weighs on both; 1: all alone, then all beside the batch that runs to its end",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--start-timeout-s", type=float, default=600.0)
    parser.add_argument("--batch-timeout-s", type=float, default=3600.0)
    parser.add_argument("--out", type=Path, default=Path("bench"))
    add_front_option(parser)
    args = parser.parse_args(argv)
    for name in ("lines", "output_tokens", "interactive", "interactive_output_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.latency_only and not 10 <= args.restart_lines <= args.lines:
        parser.error("--restart-lines must be between 10 and --lines")
    if args.rounds < 1 or args.interactive % args.rounds:
        parser.error("--interactive must be a multiple of --rounds (at least 1)")
    if args.rounds > 1 and args.alone_again:
        parser.error("--alone-again is for one round: --rounds already takes the alone phase in turns")
    if args.interactive_rate <= 0:
        parser.error("--interactive-rate must be positive")
    return args


def load_config(path: Path, store: Path) -> AppConfig:
    from serve_app.config import load_app_config, load_serve_file

    serve_file = load_serve_file(path)
    config = load_app_config(serve_file.args, source=f"{path} (application '{serve_file.app_name}' args)")
    return config.model_copy(update={"batches": config.batches.model_copy(update={"store": str(store)})})


def main(argv: Sequence[str] | None = None) -> int:
    from serve_app.config import ConfigError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="mistral-serve-batch-bench-") as tmp:
        folder = Path(tmp)
        try:
            config = load_config(args.config, folder / "store")
            record = measure(config, args, folder)
        except (ConfigError, BenchError) as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
    report = {
        "kind": "batch",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": str(args.config),
        "models": [m.id for m in config.models],
        "batches": config.batches.model_dump(exclude={"store"}),
        "conditions": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "record": record,
        "summary": summary(record),
    }
    save_report(args.out, report, "summary")
    return 0


if __name__ == "__main__":
    sys.exit(main())
