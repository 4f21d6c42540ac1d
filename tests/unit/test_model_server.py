"""The model replica's logic in this process (no Ray): what `generate` yields, what it reports to
the autoscaling policy, and ending itself when its engine dies."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from serve_app.config import ModelConfig
from serve_app.engine.fake import FakeEngine
from serve_app.engine.protocol import Head, Route, Usage
from serve_app.serving import server as server_module
from serve_app.serving.autoscaling import KV_CACHE, RUNNING, WAITING
from tests.support.inprocess import run, start_server


def _model(**engine_args: Any) -> ModelConfig:
    args = {"ttft_s": 0.0, "tokens_per_s": 1000.0, "max_num_seqs": 2, **engine_args}
    return ModelConfig(id="small", source="none", engine="fake", num_gpus=0, engine_args=args)


def _body(**fields: Any) -> bytes:
    return json.dumps({"model": "small", "messages": [{"role": "user", "content": "hi"}], **fields}).encode()


async def _collect(items: AsyncIterator[Any]) -> list[Any]:
    return [item async for item in items]


def test_generate_says_it_took_the_request_then_answers() -> None:
    async def scenario() -> tuple[list[Any], list[Any]]:
        server = await start_server(_model())
        try:
            whole = await _collect(server.generate(Route.CHAT, _body(max_tokens=4), "rid-1"))
            streamed = await _collect(server.generate(Route.CHAT, _body(max_tokens=4, stream=True), "rid-2"))
        finally:
            await server.stop()
        return whole, streamed

    whole, streamed = run(scenario)
    # `None` first: the ingress bounds only the wait for a replica to take the request.
    assert whole[0] is None and isinstance(whole[1], Head) and len(whole) == 2
    assert whole[1].usage == Usage(prompt_tokens=5, completion_tokens=4)
    assert streamed[0] is None and isinstance(streamed[1], Head) and streamed[1].stream
    assert all(isinstance(i, bytes) for i in streamed[2:-1])
    assert b"".join(streamed[2:-1]).endswith(b"data: [DONE]\n\n")
    assert streamed[-1] == Usage(prompt_tokens=5, completion_tokens=4)  # for metrics, after the stream


def test_stream_batching_interval_sends_fewer_larger_messages() -> None:
    async def messages(interval_ms: float) -> int:
        model = _model(tokens_per_s=200.0).model_copy(update={"stream_batching_interval_ms": interval_ms})
        server = await start_server(model)
        try:
            items = await _collect(server.generate(Route.CHAT, _body(max_tokens=40, stream=True), "rid"))
        finally:
            await server.stop()
        return sum(isinstance(i, bytes) for i in items)

    assert run(lambda: messages(0)) >= 30  # a 200 tokens/s stream keeps up with an idle consumer
    assert run(lambda: messages(50)) <= 8  # 40 tokens over 0.2 s, at most one message per 50 ms after two


def test_autoscaling_stats_are_the_engines_load() -> None:
    async def scenario() -> tuple[dict[str, float], dict[str, float]]:
        server = await start_server(_model(tokens_per_s=20.0))
        try:
            # Three 5 s streams on two slots: two generate, one waits in the engine.
            bodies = [_body(max_tokens=100, stream=True) for _ in range(3)]
            clients = [asyncio.ensure_future(_collect(server.generate(Route.CHAT, b, "rid"))) for b in bodies]
            await asyncio.sleep(0.2)
            busy = await server.record_autoscaling_stats()
            for client in clients:
                client.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
            idle = await server.record_autoscaling_stats()
        finally:
            await server.stop()
        return busy, idle

    busy, idle = run(scenario)
    assert busy == {RUNNING: 2.0, WAITING: 1.0, KV_CACHE: 1.0}
    assert idle == {RUNNING: 0.0, WAITING: 0.0, KV_CACHE: 0.0}


class _DyingEngine(FakeEngine):
    """An engine whose core process died: every request fails, and it says it is dead."""

    def dead(self) -> bool:
        return True

    async def handle(self, route: Route, body: bytes, request_id: str) -> AsyncIterator[Head | bytes | Usage]:
        raise RuntimeError("EngineDeadError")
        yield Head(500)


class _Ended(Exception):
    pass


def test_a_replica_whose_engine_died_ends_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    codes: list[int] = []

    def exit_(code: int) -> None:
        codes.append(code)
        raise _Ended

    monkeypatch.setattr(server_module.os, "_exit", exit_)

    async def scenario() -> None:
        server = await start_server(_model(), engine_cls=_DyingEngine)
        try:
            with contextlib.suppress(_Ended):
                await _collect(server.generate(Route.CHAT, _body(max_tokens=2), "rid"))
        finally:
            await server.stop()

    run(scenario)
    # Ended at once (the ingress then retries elsewhere), not left to the next health check.
    assert codes == [1]
