"""The load client of the operator tools: OpenAI requests sent in closed loops and timed as a
client sees them.

`bench`, `soak` and `loadstep` each say what traffic they want (a `Call` per request) and
read what came back (a `Result` per request); this module sends it. Streams are read event by
event (a Server-Sent Event ends with a blank line; the text inside may hold any character),
so time to first token (TTFT) and the gaps between tokens (ITL) are those of the first and
later chunks with generated text.

    python -m serve_app.tools.load    # stdin: a LoadSpec (one JSON line), then `go`

runs one `LoadSpec` in its own process (the benchmark's way, so that the process measuring
the servers never competes with the load); `split_spec` and `run_in_processes` spread a
level's clients over several such processes, started together, where one process's core
would cap the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import IO, TYPE_CHECKING, Any

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
    keep_text: bool = False  # keep the generated text on the result (a conversation's next turn)
    headers: tuple[tuple[str, str], ...] = ()  # sent besides Content-Type and Authorization


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
    cached_tokens: int | None = None  # prompt tokens the engine's prefix cache held (if it says)
    text: str = ""  # the generated text, when the call keeps it
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


def completion_call(
    model: str, prompt: str | list[int], max_tokens: int, *, stream: bool = True, kind: str = "", **extra: Any
) -> Call:
    """A completion of a text or token-id prompt (token ids give an exact prompt length); a
    stream asks for its usage chunk. Its chunks carry text in `choices[i].text`."""
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, **extra}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return Call(COMPLETIONS, body, kind=kind)


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
        details = usage.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            result.cached_tokens = details["cached_tokens"]


def _text(event: dict[str, Any]) -> str:
    """The generated text of a chunk or whole answer (chat or completion), first choice."""
    choices = event.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    choice = choices[0]
    for part in (choice.get("delta"), choice.get("message")):
        if isinstance(part, dict) and isinstance(part.get("content"), str):
            return str(part["content"])
    return choice["text"] if isinstance(choice.get("text"), str) else ""


def _has_text(event: dict[str, Any]) -> bool:
    """Whether a chunk carries generated text: chat's `delta.content` or completions' `text`."""
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
            if call.keep_text:
                result.text += _text(payload)
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
    headers.update(call.headers)
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
                answer = await resp.json()
                _usage(result, answer.get("usage"))
                if call.keep_text:
                    result.text = _text(answer)
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


async def open_loop(
    base_url: str, calls: Sequence[Call], interval_s: float, api_key: str | None = None
) -> tuple[list[Result], float]:
    """Send `calls` one every `interval_s` seconds, whether or not earlier ones have been
    answered (arrivals, as independent users make them); the results in call order, and the
    wall time to the last answer."""
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        t0 = time.perf_counter()

        async def at(i: int, call: Call) -> Result:
            await asyncio.sleep(max(0.0, t0 + i * interval_s - time.perf_counter()))
            return await send(session, base_url, call, t0, api_key)

        results = await asyncio.gather(*(at(i, c) for i, c in enumerate(calls)))
        return list(results), time.perf_counter() - t0


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


# --- the benchmark's way: a level in processes of its own ----------------------------------


@dataclass(frozen=True)
class RandomPrompts:
    """Token-id prompts of exactly `tokens` ids, each drawn from `low`..`high` (inclusive), a
    new one for every request, so that no prefix cache serves a prefill.

    The sequence depends only on `seed` and `stream` (who draws it: a level, a process), so
    a run can be repeated exactly and two load processes never send the same prompts.
    """

    tokens: int
    low: int
    high: int
    seed: int = 0
    stream: str = ""

    def __post_init__(self) -> None:
        if self.tokens < 1 or not 0 <= self.low <= self.high:
            raise ValueError(f"no prompts of {self.tokens} token ids in {self.low}..{self.high}")

    def prompts(self) -> Iterator[list[int]]:
        """The prompts, endlessly. A string seed is hashed with SHA-512 (not `hash()`), so the
        sequence is the same in every process and run."""
        rng = random.Random(f"{self.seed}/{self.stream}")
        ids = range(self.low, self.high + 1)
        while True:
            yield rng.choices(ids, k=self.tokens)


def with_prompt(call: Call, prompt: str | list[int]) -> Call:
    """`call` (a completion) with another prompt."""
    return replace(call, body={**call.body, "prompt": prompt})


@dataclass
class LoadSpec:
    """One closed-loop level: `concurrency` clients, `requests` in all or for `duration_s`,
    each request `call`, with a prompt of `prompts` in it when given (a completions call)."""

    url: str
    call: Call
    concurrency: int
    requests: int | None = None
    duration_s: float | None = None
    api_key: str | None = None
    read_timeout_s: float = 600.0
    prompts: RandomPrompts | None = None

    def calls(self) -> Callable[[], Call]:
        """What a client sends next."""
        if self.prompts is None:
            return lambda: self.call
        prompts = self.prompts.prompts()
        return lambda: with_prompt(self.call, next(prompts))

    def to_json(self) -> str:
        """One line of JSON (the load process reads it as its first line)."""
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> LoadSpec:
        raw = json.loads(text)
        prompts = raw.get("prompts")
        call = raw["call"]
        headers = tuple((str(name), str(value)) for name, value in call.get("headers", ()))
        return cls(
            **{
                **raw,
                "call": Call(**{**call, "headers": headers}),
                "prompts": None if prompts is None else RandomPrompts(**prompts),
            }
        )


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` as `parts` integers that differ by at most one, the larger first."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def split_spec(spec: LoadSpec, processes: int) -> list[LoadSpec]:
    """`spec` as at most `processes` specs that together run it.

    Client j goes to process j mod `processes`, so the clients split as evenly as possible;
    a request count is shared out as one loop would (each client its turn), so a level of
    fewer requests than clients still spreads over the processes. Each process draws its own
    prompts. A process that would get no client or no request is left out.
    """
    count = max(1, min(processes, spec.concurrency))
    clients = split_evenly(spec.concurrency, count)
    per_client = None if spec.requests is None else split_evenly(spec.requests, spec.concurrency)
    parts = []
    for i, c in enumerate(clients):
        requests = None if per_client is None else sum(per_client[i::count])
        if requests == 0:
            continue
        prompts = None if spec.prompts is None else replace(spec.prompts, stream=f"{spec.prompts.stream}/{i}")
        parts.append(replace(spec, concurrency=c, requests=requests, prompts=prompts))
    return parts


def run_spec(spec: LoadSpec) -> tuple[list[Result], float]:
    return asyncio.run(
        closed_loop(
            spec.url,
            spec.calls(),
            spec.concurrency,
            requests=spec.requests,
            duration_s=spec.duration_s,
            api_key=spec.api_key,
            read_timeout_s=spec.read_timeout_s,
        )
    )


READY = b"ready"
GO = b"go"


class LoadProcess:
    """One `python -m serve_app.tools.load` child: its spec in, `ready` out once it has
    imported what it needs, `go` in, its results out as JSON."""

    def __init__(self, spec: LoadSpec, stderr: IO[bytes]) -> None:
        # `stderr` is a file, not a pipe: nobody reads it while the load runs, and a full pipe
        # would stall the load.
        self._stderr = stderr
        self.proc = subprocess.Popen(
            [sys.executable, "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self._write(spec.to_json().encode())

    def _write(self, line: bytes) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):  # it ended: its stderr tells why
            self.proc.stdin.write(line + b"\n")
            self.proc.stdin.flush()

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != READY:
            raise self.failure()

    def go(self) -> None:
        self._write(GO)

    def results(self, start: float) -> tuple[list[Result], float]:
        """Its results, `start_s` counted from `start` (epoch seconds), and its span from `start`."""
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        if self.proc.wait() != 0:
            raise self.failure()
        data = json.loads(out)
        offset = float(data["began"]) - start
        results = [Result(**{**r, "start_s": r["start_s"] + offset}) for r in data["results"]]
        return results, offset + float(data["wall_s"])

    def failure(self) -> RuntimeError:
        if self.proc.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()  # one still waiting for `go` then ends
        code = self.proc.wait()
        self._stderr.seek(0)
        lines = self._stderr.read().decode(errors="replace").strip().splitlines() or ["(no output)"]
        return RuntimeError(f"the load generator failed (exit {code}): {lines[-1]}")

    def close(self) -> None:
        """Kill it if it still runs (the parent gave up on the level)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def run_in_processes(specs: Sequence[LoadSpec]) -> tuple[list[Result], float]:
    """Run `specs` at once, each in a process of its own; their results together and the wall
    time: the longest process's span, from one start they share.

    Every process first imports what it needs and says so; only then are all told to go,
    so a slow start of one does not count as load time and none runs ahead of the others.
    """
    with contextlib.ExitStack() as stack:
        procs: list[LoadProcess] = []
        for spec in specs:
            proc = LoadProcess(spec, stack.enter_context(tempfile.TemporaryFile()))
            stack.callback(proc.close)
            procs.append(proc)
        for proc in procs:
            proc.wait_ready()
        start = time.time()  # the same clock in every process, unlike perf_counter
        for proc in procs:
            proc.go()
        results: list[Result] = []
        wall = 0.0
        for proc in procs:
            part, span = proc.results(start)
            results += part
            wall = max(wall, span)
        return results, wall


def run_in_process(spec: LoadSpec) -> tuple[list[Result], float]:
    """Run one level in a separate process (`python -m serve_app.tools.load`)."""
    return run_in_processes([spec])


def main() -> int:
    """A LoadSpec as one line of JSON on stdin; `ready` on stdout; a `go` line on stdin; then
    the results as JSON on stdout. Without `go` (the parent gave up), nothing is sent."""
    spec = LoadSpec.from_json(sys.stdin.readline())
    import aiohttp  # noqa: F401  (imported before saying ready, not on the clock)

    sys.stdout.buffer.write(READY + b"\n")
    sys.stdout.flush()
    if sys.stdin.readline().strip() != GO.decode():
        return 1
    began = time.time()
    try:
        results, wall = run_spec(spec)
    except KeyboardInterrupt:
        return 130
    json.dump({"began": began, "wall_s": wall, "results": [asdict(r) for r in results]}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
