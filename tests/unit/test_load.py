"""The load client's pure parts and its processes: random token-id prompts, completion streams,
the split of a level over load processes, and processes started together against a fake server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import islice
from typing import Any

import pytest

from serve_app.tools.load import (
    COMPLETIONS,
    LoadSpec,
    RandomPrompts,
    completion_call,
    run_in_processes,
    send,
    split_evenly,
    split_spec,
)

# --- random prompts ----------------------------------------------------------------------


def test_random_prompts_have_the_exact_length_and_differ_per_request() -> None:
    prompts = list(islice(RandomPrompts(16, 1000, 32767, seed=3).prompts(), 500))
    assert all(len(p) == 16 for p in prompts)
    assert len({tuple(p) for p in prompts}) == 500
    # Not one prompt's first ids repeated: the prefix cache would serve those.
    assert len({tuple(p[:4]) for p in prompts}) == 500


def test_random_prompts_stay_in_their_range_and_reach_both_ends() -> None:
    ids = [i for p in islice(RandomPrompts(50, 5, 7).prompts(), 40) for i in p]
    assert set(ids) == {5, 6, 7}
    with pytest.raises(ValueError):
        RandomPrompts(0, 1000, 2000)
    with pytest.raises(ValueError):
        RandomPrompts(8, 2000, 1000)


def test_random_prompts_depend_on_seed_and_stream_only() -> None:
    def first(prompts: RandomPrompts) -> list[list[int]]:
        return list(islice(prompts.prompts(), 3))

    base = RandomPrompts(8, 1000, 32767, seed=1, stream="level 0/0")
    assert first(base) == first(RandomPrompts(8, 1000, 32767, seed=1, stream="level 0/0"))
    assert first(base) != first(RandomPrompts(8, 1000, 32767, seed=2, stream="level 0/0"))
    assert first(base) != first(RandomPrompts(8, 1000, 32767, seed=1, stream="level 0/1"))


def test_random_prompts_are_the_same_in_another_process() -> None:
    """A load process draws them: the sequence must not hang on the process's hash seed."""
    code = (
        "import json; from itertools import islice; from serve_app.tools.load import RandomPrompts; "
        "print(json.dumps(list(islice(RandomPrompts(8, 1000, 32767, seed=7, stream='s').prompts(), 2))))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    here = list(islice(RandomPrompts(8, 1000, 32767, seed=7, stream="s").prompts(), 2))
    assert json.loads(out.stdout) == here


def test_a_spec_fills_a_new_prompt_into_each_call_and_survives_json() -> None:
    call = completion_call("m", [], 4, temperature=0, ignore_eos=True)
    spec = LoadSpec("http://x", call, 2, 8, prompts=RandomPrompts(6, 1000, 2000, seed=1, stream="a"))
    assert LoadSpec.from_json(spec.to_json()) == spec
    with_headers = replace(spec, call=replace(call, headers=(("X-Session-Id", "s-1"),)))
    assert LoadSpec.from_json(with_headers.to_json()) == with_headers
    next_call = spec.calls()
    first, second = next_call(), next_call()
    assert first.path == second.path == COMPLETIONS
    assert len(first.body["prompt"]) == 6 and first.body["prompt"] != second.body["prompt"]
    assert {k: v for k, v in first.body.items() if k != "prompt"} == {
        "model": "m",
        "max_tokens": 4,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert call.body["prompt"] == []  # the template is left alone
    repeated = LoadSpec("http://x", call, 2, 8)
    assert repeated.calls()() is call
    assert LoadSpec.from_json(repeated.to_json()) == repeated


# --- completion streams ------------------------------------------------------------------


def _event(payload: dict[str, Any] | str) -> bytes:
    return b"data: " + (payload if isinstance(payload, str) else json.dumps(payload)).encode() + b"\n\n"


def _choice(text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "choices": [{"index": 0, "text": text, "finish_reason": finish}],
    }


COMPLETION_STREAM = b"".join(
    [
        _event(_choice(" un")),
        _event(_choice("")),  # no text: neither TTFT nor a gap
        _event(_choice(" deux\u2028")),
        _event(_choice(" trois", "length")),
        _event(_choice("", "length")),
        _event({"id": "cmpl-1", "choices": [], "usage": {"prompt_tokens": 6, "completion_tokens": 3}}),
        _event("[DONE]"),
    ]
)


class _Content:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            await asyncio.sleep(0.001)
            yield chunk


class _Response:
    status = 200

    def __init__(self, chunks: list[bytes]) -> None:
        self.content = _Content(chunks)

    async def __aenter__(self) -> _Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class _Session:
    """The one aiohttp session method `send` uses, answering with fixed bytes."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.posted: list[tuple[str, dict[str, Any]]] = []

    def post(self, url: str, data: str, headers: dict[str, str]) -> _Response:
        self.posted.append((url, json.loads(data)))
        return _Response(self.chunks)


def _pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("size", [7, 64, len(COMPLETION_STREAM)])
def test_a_completion_stream_is_timed_on_its_text_chunks(size: int) -> None:
    session = _Session(_pieces(COMPLETION_STREAM, size))
    call = completion_call("m", [1001, 1002], 3, ignore_eos=True)
    result = asyncio.run(send(session, "http://x", call, time.perf_counter()))  # type: ignore[arg-type]
    assert session.posted == [("http://x/v1/completions", call.body)]
    assert result.error is None and result.done and result.complete
    assert result.ttft_s is not None and result.ttft_s > 0
    assert len(result.itl_s) == 2  # three chunks with text; the empty ones are not tokens seen
    assert (result.prompt_tokens, result.completion_tokens) == (6, 3)


def test_a_completion_stream_without_its_usage_chunk_is_an_error() -> None:
    no_usage = b"".join([_event(_choice(" un", "length")), _event("[DONE]")])
    call = completion_call("m", [1001], 1)
    result = asyncio.run(send(_Session([no_usage]), "http://x", call, time.perf_counter()))  # type: ignore[arg-type]
    assert result.done and result.error == "no usage chunk"


# --- a level over several processes ------------------------------------------------------


def test_split_evenly() -> None:
    assert split_evenly(10, 3) == [4, 3, 3]
    assert split_evenly(9, 3) == [3, 3, 3]
    assert split_evenly(2, 4) == [1, 1, 0, 0]
    assert sum(split_evenly(1001, 7)) == 1001


def _spec(concurrency: int, requests: int | None, prompts: bool = True) -> LoadSpec:
    call = completion_call("m", [], 4)
    random = RandomPrompts(8, 1000, 2000, seed=1, stream="level 0") if prompts else None
    return LoadSpec("http://x", call, concurrency, requests, None if requests else 5.0, prompts=random)


def test_a_level_splits_its_clients_and_requests_over_processes() -> None:
    parts = split_spec(_spec(10, 25), 3)
    assert [p.concurrency for p in parts] == [4, 3, 3]
    assert [p.requests for p in parts] == [10, 8, 7]  # 2.5 per client, clients taking turns
    assert [p.prompts.stream for p in parts if p.prompts] == ["level 0/0", "level 0/1", "level 0/2"]
    assert all(p.url == "http://x" and p.call.body["max_tokens"] == 4 for p in parts)


def test_a_split_never_starts_a_process_with_nothing_to_do() -> None:
    assert [p.concurrency for p in split_spec(_spec(2, 8), 5)] == [1, 1]  # more processes than clients
    assert [p.requests for p in split_spec(_spec(64, 8), 2)] == [4, 4]  # few requests still spread
    assert [(p.concurrency, p.requests) for p in split_spec(_spec(4, 1), 2)] == [(2, 1)]
    timed = split_spec(_spec(5, None, prompts=False), 2)
    assert [(p.concurrency, p.requests, p.duration_s, p.prompts) for p in timed] == [
        (3, None, 5.0, None),
        (2, None, 5.0, None),
    ]
    assert split_spec(_spec(3, 6), 1)[0].concurrency == 3


class _StreamingHandler(BaseHTTPRequestHandler):
    """A completions server: three text chunks 10 ms apart, the usage, [DONE]."""

    prompts: list[list[int]] = []
    lock = threading.Lock()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.lock:
            self.prompts.append(body["prompt"])
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for text in (" a", " b", " c"):
            self.wfile.write(_event(_choice(text)))
            self.wfile.flush()
            time.sleep(0.01)
        usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": 3}
        self.wfile.write(_event({"choices": [], "usage": usage}) + _event("[DONE]"))

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_server() -> Iterator[tuple[str, list[list[int]]]]:
    _StreamingHandler.prompts = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StreamingHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", _StreamingHandler.prompts
    finally:
        server.shutdown()
        server.server_close()


def test_processes_run_a_level_together_and_their_results_merge(
    fake_server: tuple[str, list[list[int]]],
) -> None:
    url, prompts = fake_server
    spec = LoadSpec(
        url,
        completion_call("m", [], 3),
        4,
        12,
        prompts=RandomPrompts(5, 1000, 32767, seed=9, stream="level 0"),
    )
    results, wall = run_in_processes(split_spec(spec, 2))
    assert len(results) == 12 and all(r.complete for r in results), [r.error for r in results]
    assert all(r.completion_tokens == 3 and r.prompt_tokens == 5 for r in results)
    assert len(prompts) == 12 and len({tuple(p) for p in prompts}) == 12  # no process repeats another
    # Times count from the common start: none before it, none past the wall time.
    assert min(r.start_s for r in results) >= -0.01
    assert max(r.start_s + r.latency_s for r in results) <= wall + 0.01


def test_a_load_process_that_fails_says_why() -> None:
    """A crash in a load process (here a spec it cannot run) ends the level with its last line."""
    bad = LoadSpec("http://127.0.0.1:1", completion_call("m", [], 3), 1, None, "soon")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"load generator failed \(exit 1\): TypeError"):
        run_in_processes([bad])
