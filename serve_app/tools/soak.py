"""Soak benchmark: minutes of mixed traffic at high concurrency against the real app.

    python -m serve_app.tools.soak [CONFIG] --minutes 5 --concurrency 64 --out soak.json

Starts the app of CONFIG (default configs/local.yaml) on a private local Ray, warms it up,
then drives every model with a mix of streamed and whole chat requests, completions, bad
requests (which must get a 4xx) and clients that leave mid-stream. It reports the requests
by outcome, the errors (anything else: 5xx, a wrong status, a broken connection; the target
is 0), and the resident memory of each process of the app (Ray's, the replicas', the
engines') after the warm-up and at the end. It stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from serve_app.config import load_app_config, load_serve_file
from serve_app.local.front import add_front_option
from serve_app.local.launcher import LocalServe
from serve_app.local.processes import descendants, process_label
from serve_app.tools.load import COMPLETIONS, Call, LoadThread, Result, chat_call

APP = "soak"
KINDS = ("stream", "whole", "completion", "bad", "leave")
WEIGHTS = (60, 20, 10, 5, 5)
LEAVE_AFTER_EVENTS = 3


def memory_by_process() -> dict[str, float]:
    """Resident memory (MiB) of each process below this one, by name (`name#2` for repeats)."""
    out: dict[str, float] = {}
    for pid in sorted(descendants()):
        try:
            proc = psutil.Process(pid)
            rss = proc.memory_info().rss / 2**20
        except psutil.Error:
            continue
        name = process_label(proc)
        key, n = name, 1
        while key in out:
            n += 1
            key = f"{name}#{n}"
        out[key] = round(rss, 1)
    return out


class MixedTraffic:
    """Each call a random kind of request to a random model: streams, whole answers,
    completions, bad requests (which must get a 4xx) and clients that leave mid-stream."""

    def __init__(self, models: list[str], seed: int = 0) -> None:
        self.models = models
        self._rng = random.Random(seed)

    def __call__(self) -> Call:
        kind = self._rng.choices(KINDS, WEIGHTS)[0]
        model, max_tokens = self._rng.choice(self.models), self._rng.randint(16, 128)
        if kind == "completion":
            body = {
                "model": model,
                "prompt": "Once upon a time",
                "max_tokens": max_tokens,
                "ignore_eos": True,
            }
            return Call(COMPLETIONS, body, kind=kind)
        story = "Tell me a long story about the sea."
        if kind == "bad":
            return chat_call(model, story, -1, stream=False, kind=kind)
        call = chat_call(
            model, story, max_tokens, stream=kind in ("stream", "leave"), kind=kind, ignore_eos=True
        )
        if kind == "leave":
            return Call(call.path, call.body, kind=kind, leave_after=LEAVE_AFTER_EVENTS)
        return call


def outcome(result: Result) -> tuple[str, str | None]:
    """How a request ended, and the error it counts as (None: as expected)."""
    kind = result.kind
    if result.status is None:
        return "failed", f"connection: {result.exception}"
    if kind == "bad":
        expected = 400 <= result.status < 500 and result.openai_error
        return ("bad (4xx as expected)", None) if expected else ("bad", f"bad request got {result.status}")
    if result.status != 200:
        return kind, f"{'stream' if kind in ('stream', 'leave') else kind} got {result.status}"
    if result.left:
        return "left mid-stream", None
    if kind in ("stream", "leave"):
        if result.error and result.error.startswith("error event"):
            return kind, "error event in a stream"
        return "streamed", None if result.done else "stream ended without [DONE]"
    return kind, None if result.done else (result.error or "no answer")


def tally(results: list[Result]) -> tuple[Counter[str], Counter[str], int]:
    """Requests by outcome, errors by kind, and completion tokens of the answered ones."""
    outcomes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    tokens = 0
    for result in results:
        name, error = outcome(result)
        outcomes[name] += 1
        if error:
            errors[error] += 1
        elif not result.left:
            tokens += result.completion_tokens or 0
    return outcomes, errors, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve_app.tools.soak", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("config", nargs="?", type=Path, default=Path("configs/local.yaml"))
    parser.add_argument("--minutes", type=float, default=5.0)
    add_front_option(parser)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup-s", type=float, default=30.0, help="load before the first memory reading")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)

    serve_file = load_serve_file(args.config)
    config = load_app_config(serve_file.args, source=str(args.config))
    result: dict[str, Any] = {
        "config": str(args.config),
        "minutes": args.minutes,
        "concurrency": args.concurrency,
    }
    from serve_app.serving.builder import build_openai_app

    with LocalServe(front=args.front, dashboard=False) as local:
        print(f"Starting the app of {args.config} on {local.url}...", flush=True)
        local.deploy(build_openai_app(config), APP)
        traffic = MixedTraffic([m.id for m in config.models])
        load = LoadThread(local.url, traffic, args.concurrency, read_timeout_s=300).start()
        print(f"Warming up for {args.warmup_s:.0f} s at {args.concurrency} clients...", flush=True)
        time.sleep(args.warmup_s)
        start_memory = memory_by_process()
        local.snapshot()
        started, before = time.monotonic(), len(load.results)
        end = started + args.minutes * 60
        middle_memory: dict[str, float] | None = None
        while (now := time.monotonic()) < end:
            time.sleep(min(30.0, end - now))
            if middle_memory is None and time.monotonic() >= started + args.minutes * 30:
                middle_memory = memory_by_process()
            _, errors, _ = tally(load.results[:])
            print(
                f"  {now - started:5.0f} s  {len(load.results) - before} requests, {sum(errors.values())} errors",
                flush=True,
            )
        end_memory = memory_by_process()
        local.snapshot()
        load.stop()
        elapsed = time.monotonic() - started
        results = load.join(timeout_s=330)
        outcomes, errors, tokens = tally(results)
        result.update(
            requests=dict(outcomes),
            errors=dict(errors),
            error_count=sum(errors.values()),
            requests_per_s=round((len(results) - before) / elapsed, 1),
            completion_tokens=tokens,
            memory_mib_start=start_memory,
            memory_mib_middle=middle_memory or {},
            memory_mib_end=end_memory,
        )
    _report(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"Wrote {args.out}")
    return 0 if result.get("error_count") == 0 else 1


def _report(result: dict[str, Any]) -> None:
    print(
        f"\nSoak: {result['minutes']} min at {result['concurrency']} clients, {result['requests_per_s']} requests/s"
    )
    for outcome, n in sorted(result["requests"].items()):
        print(f"  {outcome:28s} {n}")
    print(f"  errors: {result['error_count']}" + (f" {result['errors']}" if result["errors"] else ""))
    start, middle, end = result["memory_mib_start"], result["memory_mib_middle"], result["memory_mib_end"]
    print(f"\n  {'process':40s} {'start MiB':>10s} {'middle MiB':>11s} {'end MiB':>10s} {'change':>8s}")
    for name in sorted(set(start) | set(end), key=lambda n: -end.get(n, 0)):
        a, m, b = start.get(name), middle.get(name), end.get(name)
        change = f"{b - a:+.1f}" if a is not None and b is not None else "n/a"
        cells = [f"{v:>10}" if v is not None else f"{'-':>10}" for v in (a, m, b)]
        print(f"  {name[:40]:40s} {cells[0]} {cells[1]:>11} {cells[2]} {change:>8s}")


if __name__ == "__main__":
    sys.exit(main())
