"""Soak benchmark: minutes of mixed traffic at high concurrency against the real app.

    python -m serve_app.soak [CONFIG] --minutes 5 --concurrency 64 --out soak.json

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
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil

from serve_app.config import AppConfig, load_app_config, load_serve_file
from serve_app.front import add_front_option, apply_front
from serve_app.processes import descendants, stop_local_ray

APP = "soak"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _process_name(proc: psutil.Process) -> str:
    """A stable name for one of the app's processes (Ray titles its workers `ray::...`)."""
    try:
        cmdline = proc.cmdline()
        title = cmdline[0] if cmdline else proc.name()
    except psutil.Error:
        return "?"
    if title.startswith("ray::"):
        return title.split(" ")[0]
    for known in ("raylet", "gcs_server", "dashboard", "log_monitor", "runtime_env", "monitor.py"):
        if any(known in part for part in cmdline[:3]):
            return known
    if "EngineCore" in proc.name() or any("EngineCore" in part for part in cmdline[:1]):
        return "vLLM EngineCore"
    return proc.name()


def memory_by_process() -> dict[str, float]:
    """Resident memory (MiB) of each process below this one, by name (`name#2` for repeats)."""
    out: dict[str, float] = {}
    for pid in sorted(descendants()):
        try:
            proc = psutil.Process(pid)
            rss = proc.memory_info().rss / 2**20
        except psutil.Error:
            continue
        name = _process_name(proc)
        key, n = name, 1
        while key in out:
            n += 1
            key = f"{name}#{n}"
        out[key] = round(rss, 1)
    return out


def sse_events(chunks: Iterator[bytes]) -> Iterator[str]:
    """The `data:` payloads of a Server-Sent Events stream. Events end with a blank line;
    the text inside may hold any character (httpx's iter_lines would also split it at
    U+2028 and friends, which generated text can contain)."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    yield line[6:].decode()


class Load:
    """Mixed traffic from `concurrency` client threads until `stop` is set."""

    KINDS = ("stream", "whole", "completion", "bad", "leave")
    WEIGHTS = (60, 20, 10, 5, 5)

    def __init__(self, url: str, models: list[str], concurrency: int, seed: int = 0) -> None:
        self.url = url
        self.models = models
        self.concurrency = concurrency
        self.outcomes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.tokens = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._rng = random.Random(seed)
        self._threads: list[threading.Thread] = []

    def _pick(self) -> tuple[str, str, int]:
        with self._lock:
            kind = self._rng.choices(self.KINDS, self.WEIGHTS)[0]
            return kind, self._rng.choice(self.models), self._rng.randint(16, 128)

    def _count(self, outcome: str, error: str | None = None, tokens: int = 0) -> None:
        with self._lock:
            self.outcomes[outcome] += 1
            self.tokens += tokens
            if error:
                self.errors[error] += 1

    def _one(self, http: httpx.Client) -> None:
        kind, model, max_tokens = self._pick()
        messages = [{"role": "user", "content": "Tell me a long story about the sea."}]
        body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "ignore_eos": True}
        if kind == "completion":
            path, body["prompt"] = "/v1/completions", "Once upon a time"
        else:
            path, body["messages"] = "/v1/chat/completions", messages
        if kind == "bad":
            body["max_tokens"] = -1
            resp = http.post(self.url + path, json=body)
            ok = 400 <= resp.status_code < 500 and "error" in resp.json()
            self._count(
                "bad (4xx as expected)" if ok else "bad",
                None if ok else f"bad request got {resp.status_code}",
            )
            return
        if kind in ("stream", "leave"):
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
            with http.stream("POST", self.url + path, json=body) as resp:
                if resp.status_code != 200:
                    resp.read()
                    self._count(kind, f"stream got {resp.status_code}")
                    return
                tokens, done = 0, False
                for i, data in enumerate(sse_events(resp.iter_bytes())):
                    if kind == "leave" and i == 3:
                        self._count("left mid-stream")
                        return
                    if data == "[DONE]":
                        done = True
                        continue
                    event = json.loads(data)  # parsed: generated text may say "error" too
                    if "error" in event:
                        self._count(kind, "error event in a stream")
                        return
                    if event.get("usage"):
                        tokens = int(event["usage"].get("completion_tokens") or 0)
                self._count("streamed", None if done else "stream ended without [DONE]", tokens)
            return
        resp = http.post(self.url + path, json=body)
        if resp.status_code != 200:
            self._count(kind, f"{kind} got {resp.status_code}")
            return
        self._count(
            "whole" if kind == "whole" else "completion", None, int(resp.json()["usage"]["completion_tokens"])
        )

    def _client(self) -> None:
        with httpx.Client(timeout=300) as http:
            while not self._stop.is_set():
                try:
                    self._one(http)
                except httpx.HTTPError as exc:
                    self._count("failed", f"connection: {type(exc).__name__}")

    def start(self) -> None:
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.concurrency)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=330)


def _deploy(config: AppConfig, port: int, front: str) -> None:
    import ray
    from ray import serve

    from serve_app.builder import build_openai_app

    apply_front(front)
    ray.init(
        _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False, logging_level="WARNING"
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_openai_app(config), name=APP, route_prefix="/")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve_app.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", type=Path, default=Path("configs/local.yaml"))
    parser.add_argument("--minutes", type=float, default=5.0)
    add_front_option(parser)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup-s", type=float, default=30.0, help="load before the first memory reading")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args(argv)

    serve_file = load_serve_file(args.config)
    config = load_app_config(serve_file.args, source=str(args.config))
    port = _free_port()
    owned: set[int] = set()
    result: dict[str, Any] = {
        "config": str(args.config),
        "minutes": args.minutes,
        "concurrency": args.concurrency,
    }
    try:
        print(f"Starting the app of {args.config} on 127.0.0.1:{port}...", flush=True)
        _deploy(config, port, args.front)
        owned |= descendants()
        load = Load(f"http://127.0.0.1:{port}", [m.id for m in config.models], args.concurrency)
        load.start()
        print(f"Warming up for {args.warmup_s:.0f} s at {args.concurrency} clients...", flush=True)
        time.sleep(args.warmup_s)
        start_memory = memory_by_process()
        owned |= descendants()
        started, before = time.monotonic(), sum(load.outcomes.values())
        end = started + args.minutes * 60
        middle_memory: dict[str, float] | None = None
        while (now := time.monotonic()) < end:
            time.sleep(min(30.0, end - now))
            if middle_memory is None and time.monotonic() >= started + args.minutes * 30:
                middle_memory = memory_by_process()
            done = sum(load.outcomes.values()) - before
            print(
                f"  {now - started:5.0f} s  {done} requests, {sum(load.errors.values())} errors", flush=True
            )
        end_memory = memory_by_process()
        owned |= descendants()
        load.stop()
        elapsed = time.monotonic() - started
        result.update(
            requests=dict(load.outcomes),
            errors=dict(load.errors),
            error_count=sum(load.errors.values()),
            requests_per_s=round((sum(load.outcomes.values()) - before) / elapsed, 1),
            completion_tokens=load.tokens,
            memory_mib_start=start_memory,
            memory_mib_middle=middle_memory or {},
            memory_mib_end=end_memory,
        )
    finally:
        stop_local_ray(owned)
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
