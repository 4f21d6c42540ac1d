"""The engine contract (serve_app.engine.protocol), run against the vLLM engine and the fake.

Both engines run in-process here (no Ray): the fake engine may stand in for vLLM in scale
tests only because it passes exactly these tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import inspect
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import psutil
import pytest

from serve_app.config import ModelConfig, WarmTierOptions, load_app_config, load_serve_file
from serve_app.engine.fake import FakeEngine
from serve_app.engine.protocol import AdapterRef, Engine, EngineStats, Head, Route, Usage
from serve_app.guards.adapters import AdapterError

if TYPE_CHECKING:
    from serve_app.engine.vllm.patches import Patch
from tests.conftest import ROOT

T = TypeVar("T")
MESSAGES = [{"role": "user", "content": "Who is the best French painter?"}]
# A stream far longer than any test waits for: it ends only when its client leaves.
LONG_STREAM = json.dumps(
    {"model": "tiny-mistral-v3", "messages": MESSAGES, "max_tokens": 2000, "ignore_eos": True, "stream": True}
).encode()


class Harness:
    """An engine started on its own event loop, which every call of the test then uses."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.loop = asyncio.new_event_loop()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def collect(self, route: Route, body: dict[str, Any] | bytes) -> list[Head | bytes | Usage]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()

        async def go() -> list[Head | bytes | Usage]:
            return [item async for item in self.engine.handle(route, raw, "rid-1")]

        return self.run(go())


def _vllm_model() -> ModelConfig:
    config = load_app_config(load_serve_file(ROOT / "configs/local.yaml").args, base_dir=ROOT)
    model = config.find("tiny-mistral-v3")
    assert model is not None
    return model


@pytest.fixture(scope="module", params=["fake", "vllm-2", "vllm"])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    """The fake engine, the vLLM engine core served by two frontend processes
    (serve_app.engine.vllm.frontends), and the vLLM engine: one contract for all three."""
    engine: Engine
    if request.param == "fake":
        engine = FakeEngine(
            ModelConfig(
                id="tiny-mistral-v3",
                source="none",
                engine="fake",
                engine_args={"tokens_per_s": 200},
                lora={"max_loras": 2, "max_lora_rank": 8},
            )
        )
    elif request.param == "vllm":
        from serve_app.engine.vllm.engine import VLLMEngine

        engine = VLLMEngine(_vllm_model())
    else:
        from serve_app.engine.vllm.frontends import VLLMFrontends

        engine = VLLMFrontends(_vllm_model().model_copy(update={"frontends": 2}))
    h = Harness(engine)
    h.run(engine.start())
    try:
        yield h
    finally:
        h.run(engine.shutdown())
        h.loop.close()


def _vllm_only(harness: Harness, why: str) -> None:
    """Skip a test of a vLLM fault that the fake engine cannot have."""
    if type(harness.engine).__name__ not in ("VLLMEngine", "VLLMFrontends"):
        pytest.skip(why)


def _in_process_only(harness: Harness, why: str) -> None:
    """Skip a test that reaches into vLLM in this process: the vLLM engine with one frontend."""
    if type(harness.engine).__name__ != "VLLMEngine":
        pytest.skip(why)


async def _stats(engine: Engine) -> EngineStats:
    """The engine's stats now: with frontend processes, as they see them (`stats()` there counts
    the requests the replica relays, and the scheduler's figures lag by up to half a second)."""
    return await engine.current_stats()


def _sse_payloads(items: list[Head | bytes | Usage]) -> list[str]:
    data = b"".join(i for i in items if isinstance(i, bytes)).decode()
    assert data.endswith("\n\n")
    events = data[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: ") :] for e in events]


def test_chat_non_streaming(harness: Harness) -> None:
    items = harness.collect(
        Route.CHAT, {"model": "tiny-mistral-v3", "messages": MESSAGES, "max_tokens": 5, "ignore_eos": True}
    )
    assert len(items) == 1
    head = items[0]
    assert isinstance(head, Head) and head.status == 200 and not head.stream
    body = json.loads(head.body)
    assert body["object"] == "chat.completion"
    assert body["id"] == "chatcmpl-rid-1"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert isinstance(body["choices"][0]["message"]["content"], str)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 5
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 5


def test_completion_non_streaming(harness: Harness) -> None:
    items = harness.collect(
        Route.COMPLETION, {"model": "tiny-mistral-v3", "prompt": "Hello", "max_tokens": 3, "ignore_eos": True}
    )
    head = items[0]
    assert isinstance(head, Head) and head.status == 200
    body = json.loads(head.body)
    assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str)
    assert body["usage"]["completion_tokens"] == 3


def test_chat_streaming_with_usage(harness: Harness) -> None:
    items = harness.collect(
        Route.CHAT,
        {
            "model": "tiny-mistral-v3",
            "messages": MESSAGES,
            "max_tokens": 4,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    head = items[0]
    assert isinstance(head, Head) and head.status == 200 and head.stream
    *body, usage = items[1:]
    assert all(isinstance(i, bytes) for i in body)
    # The engine's token count comes last, for metrics; it is not part of the stream.
    assert isinstance(usage, Usage) and usage.completion_tokens == 4 and usage.prompt_tokens > 0
    payloads = _sse_payloads(items)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-rid-1" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert [f for f in finishes if f] == ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


def test_completion_streaming_without_usage(harness: Harness) -> None:
    items = harness.collect(
        Route.COMPLETION,
        {"model": "tiny-mistral-v3", "prompt": "Hi", "max_tokens": 3, "ignore_eos": True, "stream": True},
    )
    payloads = _sse_payloads(items)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(not c.get("usage") for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"])


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        (Route.CHAT, {"model": "tiny-mistral-v3", "messages": "hello"}, "messages"),
        (Route.COMPLETION, {"model": "tiny-mistral-v3", "prompt": 12}, "prompt"),
        (Route.CHAT, {"model": "tiny-mistral-v3", "messages": MESSAGES, "max_tokens": 10**6}, "max_tokens"),
    ],
)
def test_bad_request_is_one_openai_400(
    harness: Harness, route: Route, body: dict[str, Any], param: str
) -> None:
    items = harness.collect(route, body)
    assert len(items) == 1
    head = items[0]
    assert isinstance(head, Head) and head.status == 400 and not head.stream
    error = json.loads(head.body)["error"]
    # vLLM reports schema errors as FastAPI would ("Bad Request", param "body.<field>").
    assert error["code"] == 400 and error["type"] in ("BadRequestError", "Bad Request") and error["message"]
    assert error["param"].removeprefix("body.") == param


def test_closing_a_stream_frees_the_request(harness: Harness) -> None:

    async def go() -> None:
        gen = harness.engine.handle(Route.CHAT, LONG_STREAM, "rid-cancel")
        assert isinstance(gen, AsyncIterator)
        head = await gen.__anext__()
        assert isinstance(head, Head) and head.stream
        await gen.__anext__()
        await gen.__anext__()
        stats = await _stats(harness.engine)
        assert stats.in_flight == 1 and stats.running + stats.waiting >= 1
        await gen.aclose()  # what a Serve cancellation does to the replica's generator
        await _released_within(harness.engine, 1.0, "after its generator was closed")

    harness.run(go())


def test_info_and_health(harness: Harness) -> None:
    assert harness.engine.info().max_model_len >= 1024
    harness.run(harness.engine.check_health())
    assert harness.run(_stats(harness.engine)).in_flight == 0


def test_the_engine_counts_what_its_prefix_cache_held(harness: Harness) -> None:
    """The counts behind the prefix-cache hit rate (serve_app.serving.routing): a prompt sent
    twice is looked up twice, and found the second time (whole blocks of it)."""
    body = {"model": "tiny-mistral-v3", "prompt": "river stone " * 200, "max_tokens": 1}
    before = harness.run(_stats(harness.engine))
    for _ in range(2):
        assert harness.collect(Route.COMPLETION, body)[0].status == 200  # type: ignore[union-attr]
    deadline = time.monotonic() + 10  # with frontends, their figures come within a second
    while True:
        after = harness.run(_stats(harness.engine))
        queries = after.prefix_cache_queries - before.prefix_cache_queries
        hits = after.prefix_cache_hits - before.prefix_cache_hits
        if (queries >= 2 * 400 and hits >= 128) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert queries >= 2 * 400 and 128 <= hits <= queries // 2, (queries, hits)


def _sleeps_and_wakes(h: Harness) -> None:
    """The warm tier's contract (serve_app.serving.warm): asleep, the engine stays healthy; awake
    again, it answers as before."""
    body = {"model": "tiny-mistral-v3", "prompt": "Paris is", "max_tokens": 5, "temperature": 0}
    before = h.collect(Route.COMPLETION, body)
    h.run(h.engine.sleep())
    h.run(h.engine.check_health())  # asleep is not ill
    h.run(h.engine.wake_up())
    after = h.collect(Route.COMPLETION, body)
    assert isinstance(before[0], Head) and isinstance(after[0], Head) and after[0].status == 200
    choice = json.loads(after[0].body)["choices"][0]
    assert choice["text"] == json.loads(before[0].body)["choices"][0]["text"]


def test_a_sleeping_engine_stays_healthy_and_answers_as_before_once_awake(harness: Harness) -> None:
    if type(harness.engine).__name__ != "FakeEngine":
        pytest.skip("the vLLM engines here start without sleep mode: test_vllm_engines_sleep_and_wake")
    _sleeps_and_wakes(harness)


@pytest.mark.parametrize("frontends", [1, 2])
def test_vllm_engines_sleep_and_wake(frontends: int) -> None:
    """Each vLLM engine started with a warm tier, where vLLM has sleep mode (CUDA, ROCm)."""
    from vllm.platforms import current_platform

    if not current_platform.is_sleep_mode_available():
        pytest.skip(
            f"vLLM's sleep mode needs a CUDA or ROCm GPU; this platform is {current_platform.device_type}"
        )
    from serve_app.engine import engine_for

    model = _vllm_model().model_copy(
        update={
            "frontends": frontends,
            "num_gpus": 1,
            "warm_tier": WarmTierOptions(sleep_after_idle_s=60, gpu_memory_share=0.3),
        }
    )
    engine = engine_for(model)(model)
    h = Harness(engine)
    h.run(engine.start())
    try:
        _sleeps_and_wakes(h)
    finally:
        h.run(engine.shutdown())
        h.loop.close()


def test_vllm_bounds_the_images_it_decodes_as_the_replica_does(harness: Harness) -> None:
    """Images vLLM fetches from an allowed host never pass serve_app.guards.media's pixel check."""
    _in_process_only(harness, "frontends: test_every_frontend_runs_the_engine_side_path")
    import vllm.envs

    assert harness.engine.limits.max_image_pixels == vllm.envs.VLLM_MAX_IMAGE_PIXELS


def _tool_parsers_alive() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if hasattr(type(o), "update_stream_state_pre_v11_tokenizer"))


def test_two_requests_under_one_id_are_kept_apart(harness: Harness) -> None:
    """A client chooses its request id: two at once may send the same one, and one that leaves
    must not end the other's request (vLLM aborts by the id a request came with)."""

    async def go() -> None:
        first = harness.engine.handle(Route.CHAT, LONG_STREAM, "rid-same")
        second = harness.engine.handle(Route.CHAT, LONG_STREAM, "rid-same")
        for stream in (first, second):
            head = await stream.__anext__()
            assert isinstance(head, Head) and head.stream
            await stream.__anext__()
        assert (await _stats(harness.engine)).in_flight == 2
        await first.aclose()  # its client left
        await asyncio.sleep(0.3)
        try:
            held = (await _stats(harness.engine)).in_flight
            assert held == 1, "the other request under that id was ended too"
            for _ in range(3):
                assert isinstance(await second.__anext__(), bytes)
        finally:
            await second.aclose()
        await _released_within(harness.engine, 2.0, "after both requests under one id were closed")

    harness.run(go())


def test_tokenize_routes_are_held_to_the_bounds(harness: Harness) -> None:
    _vllm_only(harness, "the fake engine does not tokenize")
    many = {"model": "tiny-mistral-v3", "messages": [{"role": "user", "content": "x"}] * 600}
    (head,) = harness.collect(Route.TOKENIZE, many)
    assert isinstance(head, Head) and head.status == 400, head
    assert json.loads(head.body)["error"]["param"] == "messages"
    # A chat template over tools of any size: the tools are bounded here too.
    tools = [{"type": "function", "function": {"name": f"f{i}"}} for i in range(200)]
    (head,) = harness.collect(Route.TOKENIZE, {**many, "messages": many["messages"][:1], "tools": tools})
    assert isinstance(head, Head) and head.status == 400, head
    assert json.loads(head.body)["error"]["param"] == "tools"


@contextlib.contextmanager
def _patched(harness: Harness, name: str, patched: bool) -> Iterator[Patch]:
    """Run with the engine's fix of one vLLM fault in place, or taken out (vLLM engine only)."""
    from serve_app.engine.vllm.patches import all_patches, reverted

    _in_process_only(harness, "the patches are tested in this process; frontends apply the same")
    (patch,) = [p for p in all_patches() if p.name == name]
    with contextlib.nullcontext() if patched else reverted(patch):
        yield patch


def _no_longer_needed(patch: Patch) -> str:
    from serve_app.engine.vllm.compat import vllm_version

    return (
        f"vLLM {vllm_version()} no longer has the fault '{patch.fault}' (the patch targets "
        f"{patch.targets}, tested on {', '.join(patch.tested)}): drop serve_app.engine.vllm.patches.{patch.name}"
    )


WITH_AND_WITHOUT = pytest.mark.parametrize("patched", [True, False], ids=["patched", "vllm-alone"])


@WITH_AND_WITHOUT
def test_chat_requests_leave_no_tool_parser_behind(harness: Harness, patched: bool) -> None:
    """vLLM's Mistral tool parser forms a reference cycle through ijson that the garbage
    collector cannot free; the engine breaks it when a request ends (else +70 KiB a request)."""
    with _patched(harness, "json_coroutines", patched) as patch:
        body = {"model": "tiny-mistral-v3", "messages": MESSAGES, "max_tokens": 3}
        harness.collect(Route.CHAT, body)
        before = _tool_parsers_alive()
        for i in range(10):
            harness.collect(Route.CHAT, {**body, "stream": i % 2 == 0})
        grown = _tool_parsers_alive() - before
    if patched:
        assert grown <= 1, f"{grown} tool parsers outlived 10 chat requests"
    else:
        assert grown >= 5, _no_longer_needed(patch)


def test_a_request_cancelled_at_any_moment_leaves_nothing(harness: Harness) -> None:
    """Serve cancels a replica's task wherever it waits when the client leaves: before the
    engine has the request, while it is handed over, or mid-stream. None may stay behind."""
    # Loop turns reach the early awaits one by one; delays reach the stream; the last request
    # is cancelled once it streams, however long a busy machine takes to get there.
    STREAMING = -1.0
    waits: list[tuple[int, float]] = [(turns, 0.0) for turns in range(40)]
    waits += [(0, ms / 1000) for ms in range(2, 200, 10)]
    waits += [(0, STREAMING)]
    reached: set[str] = set()

    async def go() -> None:
        for turns, delay_s in waits:
            items: list[Any] = []
            body = harness.engine.handle(Route.CHAT, LONG_STREAM, f"rid-cancel-{turns}-{delay_s}")
            task = asyncio.ensure_future(_drain(body, items))
            for _ in range(turns):
                await asyncio.sleep(0)
            if delay_s == STREAMING:
                for _ in range(3000):  # 30 s at most
                    if len(items) > 1:
                        break
                    await asyncio.sleep(0.01)
            elif delay_s:
                await asyncio.sleep(delay_s)
            reached.add(
                "streaming"
                if len(items) > 1
                else "held"
                if (await _stats(harness.engine)).in_flight
                else "early"
            )
            await _cancel(task)
            await _released_within(harness.engine, 2.0, f"cancelled after {turns} loop turns and {delay_s} s")

    harness.run(go())
    assert reached == {"early", "held", "streaming"}, f"cancellations reached only {sorted(reached)}"


@WITH_AND_WITHOUT
def test_a_request_cut_off_while_handed_to_the_engine_is_dropped(harness: Harness, patched: bool) -> None:
    """A request cancelled while it is sent to vLLM's engine core (a send waits when the socket
    is full) must not stay registered: it would count as in flight for ever."""
    with _patched(harness, "handover_abort", patched) as patch:
        core = harness.engine._client.engine_core  # type: ignore[attr-defined]

        async def go() -> bool:
            never = asyncio.get_running_loop().create_future()

            async def send_that_waits(request: Any) -> None:
                await never

            core.add_request_async = send_that_waits
            body = harness.engine.handle(Route.CHAT, LONG_STREAM, "rid-handover")
            task = asyncio.ensure_future(_drain(body))
            try:
                deadline = time.monotonic() + 5.0
                while harness.engine.stats().in_flight == 0:  # registered, now waiting on the send
                    assert time.monotonic() < deadline and not task.done(), (
                        "the request never reached the send"
                    )
                    await asyncio.sleep(0.01)
                await _cancel(task)
            finally:
                del core.add_request_async
                if not task.done():  # an assertion above failed: leave the shared engine clean
                    await _cancel(task)
            try:
                await _released_within(harness.engine, 2.0, "cancelled during its hand-over")
                return True
            except AssertionError:
                return False
            finally:
                await _abort_everything(harness.engine)

        released = harness.run(go())
    assert released is patched, None if patched else _no_longer_needed(patch)


async def _abort_everything(engine: Engine) -> None:
    """Abort whatever vLLM still holds, so that the shared engine is left clean."""
    client = engine._client  # type: ignore[attr-defined]
    held = list(client.output_processor.request_states)  # vLLM's own (internal) request ids
    if held:
        internal = {"internal": True} if "internal" in inspect.signature(client.abort).parameters else {}
        await client.abort(held, **internal)
        await _released_within(engine, 2.0, "aborted at the end of a test")


async def _drain(items: AsyncIterator[Any], into: list[Any] | None = None) -> None:
    async for item in items:
        if into is not None:
            into.append(item)


async def _cancel(task: asyncio.Future[Any]) -> None:
    """Cancel `task` as Serve does when a client leaves, and let it end."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _released_within(engine: Engine, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while (held := (await _stats(engine)).in_flight) != 0:
        assert time.monotonic() < deadline, (
            f"{held} request(s) still held {seconds:g} s after a client left, {what}"
        )
        await asyncio.sleep(0.02)


@WITH_AND_WITHOUT
def test_tool_parser_tables_are_built_once_per_tokenizer(harness: Harness, patched: bool) -> None:
    """vLLM 0.32 rebuilds its tool parser's special-token table (about a thousand regexes for
    Mistral's tokenizers) for every chat request; the engine keeps one per tokenizer."""
    with _patched(harness, "parser_tables", patched) as patch:
        module = importlib.import_module("vllm.parser.engine.streaming_parser_engine")
        build = module._build_drop_info
        tables: list[Any] = []

        def recorded(config: Any, tokenizer: Any) -> Any:
            tables.append(build(config, tokenizer))
            return tables[-1]

        module._build_drop_info = recorded
        try:
            for _ in range(3):
                harness.collect(
                    Route.CHAT, {"model": "tiny-mistral-v3", "messages": MESSAGES, "max_tokens": 2}
                )
        finally:
            module._build_drop_info = build
    assert len(tables) >= 3, "chat requests no longer build the table: " + _no_longer_needed(patch)
    distinct = len({id(table) for table in tables})
    if patched:
        assert distinct == 1, f"{distinct} tables for one tokenizer"
    else:
        assert distinct == len(tables), _no_longer_needed(patch)


def test_every_frontend_runs_the_engine_side_path(harness: Harness) -> None:
    """Each frontend process has the fixes of vLLM's faults in place and the replica's image
    bound, and runs in a process of its own under this one."""
    if type(harness.engine).__name__ != "VLLMFrontends":
        pytest.skip("one frontend: the engine runs in this process")
    from serve_app.engine.vllm.patches import apply_all

    facts = harness.run(harness.engine.facts())  # type: ignore[attr-defined]
    ours = {p.pid for p in psutil.Process().children(recursive=True)}
    assert len({f["pid"] for f in facts}) == 2 and {f["pid"] for f in facts} <= ours, facts
    expected = apply_all()
    assert expected, "no vLLM fix applies to this release"
    for fact in facts:
        assert fact["patches"] == expected, fact
        assert fact["max_image_pixels"] == harness.engine.limits.max_image_pixels, fact


def test_requests_go_to_the_least_busy_frontend(harness: Harness) -> None:
    if type(harness.engine).__name__ != "VLLMFrontends":
        pytest.skip("one frontend")

    async def go() -> None:
        streams = [harness.engine.handle(Route.CHAT, LONG_STREAM, f"rid-spread-{i}") for i in range(4)]
        try:
            for stream in streams:
                await stream.__anext__()
                await stream.__anext__()
            facts = await harness.engine.facts()  # type: ignore[attr-defined]
            assert [f["in_flight"] for f in facts] == [2, 2], facts
        finally:
            for stream in streams:
                await stream.aclose()
        await _released_within(harness.engine, 2.0, "after the spread streams were closed")

    harness.run(go())


ADAPTERS = ROOT / "models" / "adapters"


def _answers(harness: Harness, model: str, count: int, named: str | None = None) -> list[tuple[int, str]]:
    """`count` greedy chats to `model` at once (so that each frontend of several takes some):
    their statuses and texts; each answer says it is `named`'s (default: `model`)."""
    body = json.dumps({"model": model, "messages": MESSAGES, "max_tokens": 6, "temperature": 0}).encode()

    async def one(n: int) -> tuple[int, str]:
        items = [item async for item in harness.engine.handle(Route.CHAT, body, f"lora-{n}")]
        head = items[0]
        assert isinstance(head, Head)
        answer = json.loads(head.body)
        if head.status != 200:
            return head.status, answer["error"]["message"]
        assert answer["model"] == (named or model)
        return 200, answer["choices"][0]["message"]["content"]

    async def go() -> list[tuple[int, str]]:
        return list(await asyncio.gather(*(one(n) for n in range(count))))

    return harness.run(go())


def test_an_adapter_serves_its_name_until_removed(harness: Harness) -> None:
    name = "tiny-mistral-v3-lora-1"
    adapter = AdapterRef(name, str(ADAPTERS / name), lora_id=41, aliases=("lora-one",))
    assert {status for status, _ in _answers(harness, name, 1)} == {404}
    base = _answers(harness, "tiny-mistral-v3", 1)[0][1]
    harness.run(harness.engine.add_adapter(adapter))
    try:
        answers = _answers(harness, name, 4)
        assert {status for status, _ in answers} == {200}
        assert (
            len({text for _, text in answers}) == 1 and answers[0][1] != base
        )  # its own weights, everywhere
    finally:
        harness.run(harness.engine.remove_adapter(adapter))
    assert {status for status, _ in _answers(harness, name, 2)} == {404}


def test_an_adapter_that_cannot_load_is_a_4xx_and_disturbs_nothing(harness: Harness) -> None:
    with pytest.raises(AdapterError) as err:
        harness.run(harness.engine.add_adapter(AdapterRef("gone", str(ADAPTERS / "missing"), lora_id=42)))
    assert 400 <= err.value.status < 500
    assert {status for status, _ in _answers(harness, "tiny-mistral-v3", 2)} == {200}
    assert {status for status, _ in _answers(harness, "gone", 1)} == {404}


def test_an_engine_whose_core_process_died_is_dead_at_once(harness: Harness) -> None:
    """Last in this module: it ends the engine. A replica asks `dead()` before it takes a
    request; vLLM marks its client errored only once its monitor thread has run, so the engine
    looks at its core processes too."""
    _vllm_only(harness, "the fake engine has no process to lose")
    assert not harness.engine.dead()
    ours = {p.pid for p in psutil.Process().children(recursive=True)}
    cores = harness.engine.core_pids  # type: ignore[attr-defined]
    assert cores and set(cores) <= ours, (cores, ours)
    for pid in cores:
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in cores):
        assert time.monotonic() < deadline, "the engine core outlived SIGKILL for 10 s"
        time.sleep(0.001)
    assert harness.engine.dead()
