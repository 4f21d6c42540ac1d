"""The replica's relay to its frontend processes, and the wire between them, without vLLM.

Each "frontend" here is a Unix socket served in-process by the real connection handler of
serve_app.engine.vllm.frontend_process around a stub engine; the relay under test is the
replica's real `FrontendRelay`.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from serve_app.engine.protocol import Head, Route, Usage
from serve_app.engine.vllm import wire
from serve_app.engine.vllm.engine import Load
from serve_app.engine.vllm.frontend_process import _answer
from serve_app.engine.vllm.frontends import Frontend, FrontendRelay, VLLMFrontends

T = TypeVar("T")


class StubEngine:
    """What a frontend's engine offers the connection handler; `chunks` chunks per request,
    `delay_s` apart; records requests it saw end, and how."""

    def __init__(self, chunks: int = 3, delay_s: float = 0.0, fail: bool = False) -> None:
        self.chunks, self.delay_s, self.fail = chunks, delay_s, fail
        self.running: set[str] = set()
        self.closed: list[str] = []
        self.last_step = time.monotonic()
        self.patches: list[str] = []

    async def handle(self, route: Route, body: bytes, request_id: str) -> AsyncIterator[Head | bytes | Usage]:
        if self.fail:
            raise RuntimeError("the engine broke")
        self.running.add(request_id)
        try:
            yield Head(200, stream=True)
            for i in range(self.chunks):
                await asyncio.sleep(self.delay_s)
                yield f"data: {request_id} {i}\n\n".encode()
            yield Usage(prompt_tokens=len(body), completion_tokens=self.chunks)
        finally:
            self.running.discard(request_id)
            self.closed.append(request_id)

    def load(self) -> Load:
        return Load(len(self.running), len(self.running), 0, 0.5, self.last_step)

    async def check_alive(self) -> None:
        return None


async def _serve(engines: list[StubEngine], directory: str) -> tuple[FrontendRelay, list[asyncio.Server]]:
    frontends, servers = [], []
    for i, engine in enumerate(engines):
        path = str(Path(directory) / f"f{i}.sock")
        servers.append(await asyncio.start_unix_server(lambda r, w, e=engine: _answer(e, r, w), path=path))  # type: ignore[misc]
        frontends.append(Frontend(i, path, os.getpid()))
    return FrontendRelay(frontends), servers


def _run(test: Any, *engines: StubEngine) -> Any:
    async def go() -> Any:
        with tempfile.TemporaryDirectory() as directory:
            relay, servers = await _serve(list(engines), directory)
            try:
                return await test(relay)
            finally:
                for server in servers:
                    server.close()

    return asyncio.run(go())


def _collect(relay: FrontendRelay, request_id: str) -> Coroutine[Any, Any, list[Any]]:
    async def go() -> list[Any]:
        return [item async for item in relay.handle(Route.CHAT, b'{"x": 1}', request_id)]

    return go()


def test_a_request_is_relayed_whole_and_in_order() -> None:
    items = _run(lambda relay: _collect(relay, "r1"), StubEngine(chunks=3))
    assert items == [
        Head(200, stream=True),
        b"data: r1 0\n\n",
        b"data: r1 1\n\n",
        b"data: r1 2\n\n",
        Usage(prompt_tokens=8, completion_tokens=3),
    ]


def test_a_client_that_leaves_ends_its_request_in_the_frontend() -> None:
    engine = StubEngine(chunks=10_000, delay_s=0.01)

    async def test(relay: FrontendRelay) -> float:
        stream = relay.handle(Route.CHAT, b"{}", "leaver")
        for _ in range(3):
            await stream.__anext__()
        assert engine.running == {"leaver"}
        await stream.aclose()  # what Serve does when the client disconnects
        left = time.monotonic()
        while engine.running:
            await asyncio.sleep(0.005)
            assert time.monotonic() - left < 1.0, "the frontend still runs the request 1 s later"
        assert relay.stats().in_flight == 0
        return time.monotonic() - left

    _run(test, engine)
    assert engine.closed == ["leaver"]


def test_requests_go_to_the_frontend_with_the_fewest() -> None:
    engines = [StubEngine(chunks=10_000, delay_s=0.01), StubEngine(chunks=10_000, delay_s=0.01)]

    async def test(relay: FrontendRelay) -> list[int]:
        streams = [relay.handle(Route.CHAT, b"{}", f"r{i}") for i in range(5)]
        for stream in streams:
            await stream.__anext__()
        counts = [len(e.running) for e in engines]
        assert relay.stats().in_flight == 5
        for stream in streams:
            await stream.aclose()
        return counts

    assert sorted(_run(test, *engines)) == [2, 3]


def test_an_engine_error_reaches_the_replica_as_an_error() -> None:
    async def test(relay: FrontendRelay) -> None:
        with pytest.raises(wire.FrontendError, match="the engine broke"):
            await _collect(relay, "r1")

    _run(test, StubEngine(fail=True))


def test_the_load_is_the_sum_of_requests_and_the_freshest_scheduler_view() -> None:
    older, newer = StubEngine(chunks=10_000, delay_s=0.01), StubEngine(chunks=10_000, delay_s=0.01)
    older.last_step, newer.last_step = time.monotonic() - 5, time.monotonic()

    async def test(relay: FrontendRelay) -> None:
        streams = [relay.handle(Route.CHAT, b"{}", f"r{i}") for i in range(3)]
        for stream in streams:
            await stream.__anext__()
        now = await relay.current_stats()
        assert now.in_flight == 3
        load = relay.engine_load()
        assert load is not None and load.last_step == newer.last_step
        assert relay.stats().in_flight == 3 and relay.busy
        for stream in streams:
            await stream.aclose()

    _run(test, older, newer)


def test_a_frontend_call_answers_or_fails_plainly() -> None:
    async def test(relay: FrontendRelay) -> None:
        assert await relay.call(relay.frontends[0], "alive") is None
        with pytest.raises(wire.FrontendError, match="unknown call"):
            await relay.call(relay.frontends[0], "reboot")

    _run(test, StubEngine())


def test_wire_frames_round_trip_and_refuse_a_broken_stream() -> None:
    async def read(data: bytes) -> list[Any]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        items = []
        while True:
            try:
                items.append(await wire.read_item(reader))
            except wire.End:
                return items

    frames = wire.item_frame(b"data: x\n\n") + wire.item_frame(Head(400, b"{}")) + wire.end_frame()
    assert asyncio.run(read(frames)) == [b"data: x\n\n", Head(400, b"{}")]
    with pytest.raises(wire.FrontendError, match="bad"):
        asyncio.run(read(wire.error_frame("bad")))
    with pytest.raises(wire.FrontendError, match="broken"):
        asyncio.run(read((wire.MAX_FRAME + 1).to_bytes(4, "big") + b"\x00"))
    with pytest.raises(asyncio.IncompleteReadError):
        asyncio.run(read(wire.item_frame(b"data: cut short")[:-3]))


def test_an_engine_with_a_dead_frontend_is_dead() -> None:
    from serve_app.config import ModelConfig

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    engine = VLLMFrontends(ModelConfig(id="m", source="/nowhere", frontends=2))
    assert not engine.dead()  # not started
    engine._launch = object()  # type: ignore[assignment]
    engine._relay = FrontendRelay([Frontend(0, "", os.getpid()), Frontend(1, "", int(gone.stdout))])
    assert engine.dead()
    engine._relay = FrontendRelay([Frontend(0, "", os.getpid())])
    assert not engine.dead()


def test_requests_in_flight_fail_at_once_when_the_engine_is_gone() -> None:
    engine = StubEngine(chunks=10_000, delay_s=0.01)

    async def test(relay: FrontendRelay) -> None:
        stream = relay.handle(Route.CHAT, b"{}", "stranded")
        for _ in range(3):
            await stream.__anext__()
        relay.fail_all()  # what the replica does once a process of its engine has died

        async def rest() -> None:
            async for _ in stream:  # what was already buffered, then the error
                pass

        with pytest.raises(RuntimeError, match="went away mid-request"):
            await asyncio.wait_for(rest(), timeout=1.0)
        assert relay.stats().in_flight == 0

    _run(test, engine)
