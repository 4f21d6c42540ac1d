"""The load client of the operator tools: OpenAI requests sent in closed loops and timed as a
client sees them.

`bench`, `soak` and `loadstep` each say what traffic they want (a `Call` per request) and
read what came back (a `Result` per request); this module sends it. Streams are read event by
event (a Server-Sent Event ends with a blank line; the text inside may hold any character),
so time to first token (TTFT) and the gaps between tokens (ITL) are those of the first and
later chunks with generated text.

    python -m serve_app.tools.load < spec.json > results.json

runs one `LoadSpec` in its own process (the benchmark's way, so that the process measuring
the servers never competes with the load).
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import aiohttp

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
DONE = b"[DONE]"


@dataclass(frozen=True)
class Call:
    """One request to send: a JSON body to `path`; a stream if the body says so."""

    path: str
    body: dict[str, Any]
    kind: str = ""  # the caller's label, kept on the result
    leave_after: int | None = None  # close a stream after this many events: a client that leaves


@dataclass
class Result:
    """One request as its client saw it (times in seconds)."""

    start_s: float  # since the load began
    latency_s: float = 0.0
    kind: str = ""
    status: int | None = None  # None: no HTTP answer
    ttft_s: float | None = None  # to the first chunk with generated text (streams)
    itl_s: list[float] = field(default_factory=list)  # between chunks with generated text
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    done: bool = False  # answered whole: a 200 body, or a stream to its [DONE]
    left: bool = False  # the client left mid-stream on purpose (`leave_after`)
    error: str | None = None  # why it failed, for people: "HTTP 503: ...", "error event: ..."
    openai_error: bool = False  # a refusal came as an OpenAI error body ({"error": {...}})
    exception: str | None = None  # the client exception's type, when there was no HTTP answer

    @property
    def complete(self) -> bool:
        """Answered whole, without an error."""
        return self.done and self.error is None


def chat_call(
    model: str, content: str, max_tokens: int, *, stream: bool = True, kind: str = "", **extra: Any
) -> Call:
    """A chat completion of one user message; a stream asks for its usage chunk."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        **extra,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return Call(CHAT, body, kind=kind)


def error_text(status: int, body: str) -> tuple[str, bool]:
    """`HTTP <status>: <the OpenAI error's message>` (or the start of the body), and whether the
    body was an OpenAI error."""
    try:
        message, shaped = json.loads(body)["error"]["message"], True
    except (ValueError, KeyError, TypeError):
        message, shaped = body, False
    return f"HTTP {status}: {str(message).strip()[:200]}", shaped


def _usage(result: Result, usage: Any) -> None:
    if isinstance(usage, dict):
        result.prompt_tokens = usage.get("prompt_tokens")
        result.completion_tokens = usage.get("completion_tokens")


def _has_text(event: dict[str, Any]) -> bool:
    return any(
        (choice.get("delta") or {}).get("content") or choice.get("text")
        for choice in event.get("choices") or []
        if isinstance(choice, dict)
    )


class EventSplitter:
    """The `data:` payloads of a Server-Sent Events stream, as its bytes arrive."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The payloads of the events `chunk` completes (an event ends with a blank line)."""
        self._buffer += chunk
        *complete, self._buffer = self._buffer.split(b"\n\n")
        return [
            line[5:].strip() for event in complete for line in event.split(b"\n") if line.startswith(b"data:")
        ]


def sse_events(chunks: Iterable[bytes]) -> Iterator[str]:
    """The `data:` payloads of a stream read whole (httpx's `iter_bytes()`, say). Unlike
    line-splitting readers, it keeps U+2028 and friends, which generated text can contain."""
    splitter = EventSplitter()
    for chunk in chunks:
        for data in splitter.feed(chunk):
            yield data.decode()


async def _read_stream(resp: aiohttp.ClientResponse, call: Call, result: Result, sent: float) -> None:
    """Read a 200 stream event by event into `result`."""
    splitter, events, last = EventSplitter(), 0, None
    async for chunk in resp.content.iter_any():
        for data in splitter.feed(chunk):
            events += 1
            if call.leave_after is not None and events > call.leave_after:
                result.left = True
                return
            if data == DONE:
                result.done = True
                return
            payload = json.loads(data)  # parsed: generated text may say "error" too
            if "error" in payload:
                error = payload["error"]
                message = error.get("message", "") if isinstance(error, dict) else error
                result.error = f"error event: {str(message)[:200]}"
                return
            _usage(result, payload.get("usage"))
            if _has_text(payload):
                now = time.perf_counter()
                if last is None:
                    result.ttft_s = now - sent
                else:
                    result.itl_s.append(now - last)
                last = now


async def send(
    session: aiohttp.ClientSession, base_url: str, call: Call, t0: float, api_key: str | None = None
) -> Result:
    """Send one call and read its answer whole; never raises for what the server does."""
    import aiohttp

    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    sent = time.perf_counter()
    result = Result(start_s=sent - t0, kind=call.kind)
    try:
        async with session.post(base_url + call.path, data=json.dumps(call.body), headers=headers) as resp:
            result.status = resp.status
            if resp.status != 200:
                result.error, result.openai_error = error_text(resp.status, await resp.text())
            elif call.body.get("stream"):
                await _read_stream(resp, call, result, sent)
                if result.error is None and not (result.done or result.left):
                    result.error = "stream ended without [DONE]"
                elif result.done and result.completion_tokens is None and _asks_usage(call):
                    result.error = "no usage chunk"
            else:
                _usage(result, (await resp.json()).get("usage"))
                result.done = True
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        result.exception = type(exc).__name__
        result.error = f"{type(exc).__name__}: {str(exc)[:200]}"
    result.latency_s = time.perf_counter() - sent
    return result


def send_one(base_url: str, call: Call, api_key: str | None = None, read_timeout_s: float = 600.0) -> Result:
    """Send one call from a thread with no event loop, and read its answer whole."""
    import aiohttp

    async def go() -> Result:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=read_timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            return await send(session, base_url, call, time.perf_counter(), api_key)

    return asyncio.run(go())


def _asks_usage(call: Call) -> bool:
    options = call.body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


async def closed_loop(
    base_url: str,
    next_call: Callable[[], Call | None],
    concurrency: int,
    *,
    requests: int | None = None,
    duration_s: float | None = None,
    starts_s: Sequence[float] | None = None,
    stop: threading.Event | None = None,
    api_key: str | None = None,
    read_timeout_s: float = 600.0,
    results: list[Result] | None = None,
) -> tuple[list[Result], float]:
    """`concurrency` clients, each sending `next_call()`s back to back, until `requests` were
    sent in all, `duration_s` passed, `stop` is set or `next_call` says None. Client i starts
    `starts_s[i]` seconds in (default: all at once). Returns the results (appended to
    `results` as they come, when given) and the wall time."""
    import aiohttp

    out: list[Result] = [] if results is None else results
    issued = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=read_timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        deadline = None if duration_s is None else t0 + duration_s

        def another() -> Call | None:
            nonlocal issued
            if stop is not None and stop.is_set():
                return None
            if deadline is not None and time.perf_counter() >= deadline:
                return None
            if requests is not None:
                if issued >= requests:
                    return None
                issued += 1
            return next_call()

        async def client(start_s: float) -> None:
            while time.perf_counter() - t0 < start_s:
                if (stop is not None and stop.is_set()) or (
                    deadline is not None and time.perf_counter() >= deadline
                ):
                    return
                await asyncio.sleep(0.05)
            while (call := another()) is not None:
                out.append(await send(session, base_url, call, t0, api_key))

        starts = list(starts_s or [0.0] * concurrency)
        await asyncio.gather(*(client(s) for s in starts))
        wall = time.perf_counter() - t0
    return out, wall


class LoadThread:
    """A closed loop run on its own event loop in a thread, read while it runs (soak, load step)."""

    def __init__(self, base_url: str, next_call: Callable[[], Call | None], concurrency: int, **options: Any):
        self.results: list[Result] = []
        self.wall_s = 0.0
        self._stop = threading.Event()
        self._failure: BaseException | None = None

        def run() -> None:
            try:
                _, self.wall_s = asyncio.run(
                    closed_loop(
                        base_url,
                        next_call,
                        concurrency,
                        stop=self._stop,
                        results=self.results,
                        **options,
                    )
                )
            except BaseException as exc:  # reported by join()
                self._failure = exc

        self._thread = threading.Thread(target=run, daemon=True)

    def start(self) -> LoadThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Send no new request; those under way finish."""
        self._stop.set()

    def join(self, timeout_s: float | None = None) -> list[Result]:
        self._thread.join(timeout_s)
        if self._failure is not None:
            raise self._failure
        return self.results


# --- the benchmark's way: one level in a process of its own -----------------------------


@dataclass
class LoadSpec:
    """One closed-loop level of identical calls: `concurrency` clients, `requests` in all or
    for `duration_s`."""

    url: str
    call: Call
    concurrency: int
    requests: int | None = None
    duration_s: float | None = None
    api_key: str | None = None
    read_timeout_s: float = 600.0


def run_spec(spec: LoadSpec) -> tuple[list[Result], float]:
    return asyncio.run(
        closed_loop(
            spec.url,
            lambda: spec.call,
            spec.concurrency,
            requests=spec.requests,
            duration_s=spec.duration_s,
            api_key=spec.api_key,
            read_timeout_s=spec.read_timeout_s,
        )
    )


def run_in_process(spec: LoadSpec) -> tuple[list[Result], float]:
    """Run one level in a separate process (`python -m serve_app.tools.load`)."""
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, "-m", __name__],
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
        raise RuntimeError(f"the load generator failed (exit {proc.returncode}): {lines[-1]}")
    data = json.loads(out)
    return [Result(**r) for r in data["results"]], float(data["wall_s"])


def main() -> int:
    """A LoadSpec as JSON on stdin; the results as JSON on stdout."""
    raw = json.loads(sys.stdin.read())
    spec = LoadSpec(**{**raw, "call": Call(**raw["call"])})
    try:
        results, wall = run_spec(spec)
    except KeyboardInterrupt:
        return 130
    json.dump({"wall_s": wall, "results": [asdict(r) for r in results]}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
