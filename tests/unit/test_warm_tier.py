"""The warm tier without Ray: the GPU lease book, and a replica's sleeps and wakes over the fake
engine (whose sleep and wake take set times). Ray-backed: tests/cluster/test_warm_tier.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from serve_app.config import ConfigError, ModelConfig, WarmTierOptions
from serve_app.engine.fake import FakeEngine
from serve_app.engine.protocol import Route
from serve_app.serving.gpu_lease import BookLease, HolderInfo, LeaseBook
from serve_app.serving.warm import State, WakeFailed, WarmTier


def _run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=30))  # type: ignore[arg-type]


async def _eventually(check: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# The lease book


def test_a_waker_makes_the_least_recently_used_sleep_and_waits_for_it() -> None:
    async def go() -> None:
        book = LeaseBook()
        a, b, c = (HolderInfo(x, f"model-{x}", 0.4) for x in "abc")
        await book.acquire(a)
        await book.acquire(b)
        await book.poll(a, awake=True, last_used=time.time(), wait_s=0)  # a was used after b
        waking = asyncio.ensure_future(book.acquire(c))
        assert await book.poll(b, awake=True, last_used=0, wait_s=1) is True  # b is asked, not a
        assert await book.poll(a, awake=True, last_used=0, wait_s=0) is False
        assert not waking.done()  # c waits until b has slept
        await book.release(b)
        assert await waking == ["model-b"]
        assert set(book.awake()) == {"a", "c"}

    _run(go())


def test_no_more_are_awake_than_fit() -> None:
    async def go() -> None:
        book = LeaseBook()
        holders = [HolderInfo(f"r{i}", f"model-{i}", 0.6) for i in range(3)]
        peak = 0

        async def replica(info: HolderInfo) -> None:
            nonlocal peak
            for _ in range(4):
                await book.acquire(info)
                peak = max(peak, len(book.awake()))
                await asyncio.sleep(0.01)  # serve a little
                await book.release(info)

        await asyncio.gather(*(replica(h) for h in holders))
        assert peak == 1

    _run(go())


def test_the_share_of_a_replica_that_is_gone_is_freed() -> None:
    async def go() -> None:
        book = LeaseBook(lost_after_s=0.2)
        gone, waker = HolderInfo("gone", "a", 0.7), HolderInfo("new", "b", 0.7)
        await book.acquire(gone)  # and never polls again
        t0 = time.monotonic()
        await book.acquire(waker)
        assert time.monotonic() - t0 >= 0.2
        assert book.awake() == {"new": "b"}

    _run(go())


def test_a_new_book_grants_nothing_until_the_awake_replicas_have_reported() -> None:
    async def go() -> None:
        book = LeaseBook(settle_s=0.5)  # as after a restart of the keeper
        awake, waker = HolderInfo("awake", "a", 0.6), HolderInfo("waker", "b", 0.6)
        waking = asyncio.ensure_future(book.acquire(waker))
        await asyncio.sleep(0.1)
        assert await book.poll(awake, awake=True, last_used=0, wait_s=0) is False  # it reports in
        assert await book.poll(awake, awake=True, last_used=0, wait_s=1) is True  # and is asked
        assert not waking.done()
        await book.release(awake)
        await waking

    _run(go())


def test_a_wake_reported_by_a_poll_before_its_acquire_does_not_skip_the_wait() -> None:
    async def go() -> None:
        book = LeaseBook()
        a, b = HolderInfo("a", "model-a", 0.6), HolderInfo("b", "model-b", 0.6)
        await book.acquire(a)
        # b's poll, sent as b began to wake, arrives before its acquire.
        await book.poll(b, awake=True, last_used=0, wait_s=0)
        waking = asyncio.ensure_future(book.acquire(b))
        await asyncio.sleep(0.1)
        assert not waking.done()  # b waits for a, as any waker
        await book.release(a)
        await waking
        assert book.awake() == {"b": "model-b"}

    _run(go())


def test_a_grant_nobody_holds_is_freed_by_the_holders_next_polls() -> None:
    async def go() -> None:
        book = LeaseBook()
        a = HolderInfo("a", "model-a", 0.6)
        await book.acquire(a)  # and the holder gave up on it (its wait timed out)
        assert book.awake() == {"a": "model-a"}
        await book.poll(a, awake=False, last_used=0, wait_s=0)
        assert book.awake() == {"a": "model-a"}  # too soon: the poll may predate the grant
        book._holders["a"].granted -= 10  # the grant is old now
        await book.poll(a, awake=False, last_used=0, wait_s=0)
        assert book.awake() == {}

    _run(go())


def test_a_share_larger_than_the_gpu_is_refused() -> None:
    with pytest.raises(ValueError, match=r"needs 1\.5"):
        _run(LeaseBook().acquire(HolderInfo("r", "m", 1.5)))


def test_a_restarted_book_learns_who_is_awake_from_the_polls() -> None:
    async def go() -> None:
        book = LeaseBook()  # the old book knew "a" awake; this one knows nothing
        a, b = HolderInfo("a", "model-a", 0.6), HolderInfo("b", "model-b", 0.6)
        assert await book.poll(a, awake=True, last_used=0, wait_s=0) is False
        waking = asyncio.ensure_future(book.acquire(b))
        assert await book.poll(a, awake=True, last_used=0, wait_s=1) is True
        await book.release(a)
        await waking

    _run(go())


# A replica's warm tier


def _fake(model_id: str = "m", **knobs: float) -> FakeEngine:
    args = {"ttft_s": 0.01, "tokens_per_s": 1000, "sleep_s": 0.05, "wake_s": 0.1, **knobs}
    return FakeEngine(ModelConfig(id=model_id, source="none", engine="fake", engine_args=args))


async def _tier(engine: FakeEngine, lease: Any = None, **options: Any) -> WarmTier:
    """A replica's tier, started as ModelServer starts it: the lease, then the engine."""
    tier = WarmTier(engine.config.id, engine, WarmTierOptions(**{"sleep_after_idle_s": 60, **options}), lease)
    await tier.before_start()
    await engine.start()
    tier.run()
    return tier


async def _request(tier: WarmTier, engine: FakeEngine, hold_s: float = 0.0) -> None:
    await tier.enter()
    try:
        body = b'{"model": "m", "prompt": "hi", "max_tokens": 2}'
        items = [item async for item in engine.handle(Route.COMPLETION, body, "r")]
        assert items and getattr(items[0], "status", None) == 200
        await asyncio.sleep(hold_s)
    finally:
        tier.leave()


def test_an_idle_replica_sleeps_and_the_next_request_wakes_it() -> None:
    async def go() -> None:
        engine = _fake()
        tier = await _tier(engine, sleep_after_idle_s=0.3)
        await _request(tier, engine)
        await _eventually(lambda: tier.state is State.ASLEEP)
        assert engine.asleep and tier.sleeps == {"idle": 1, "forced": 0}
        # Requests that arrive together share one wake.
        await asyncio.gather(*(_request(tier, engine) for _ in range(5)))
        assert tier.wakes == 1 and not engine.asleep
        await tier.close()

    _run(go())


@pytest.mark.parametrize("fault", ["error", "hang"])
def test_a_failed_wake_fails_every_request_that_waited_and_marks_the_replica_for_replacement(
    fault: str,
) -> None:
    async def go() -> None:
        engine = _fake()
        tier = await _tier(engine, sleep_after_idle_s=0.1, wake_timeout_s=0.5)
        await _eventually(lambda: tier.state is State.ASLEEP)

        async def broken() -> None:
            await asyncio.sleep(0.05 if fault == "error" else 60)
            raise RuntimeError("CUDA error")

        engine.wake_up = broken  # type: ignore[method-assign]
        results = await asyncio.gather(*(_request(tier, engine) for _ in range(3)), return_exceptions=True)
        assert all(isinstance(r, WakeFailed) for r in results), results
        assert tier.fatal is not None and ("in time" in tier.fatal) == (fault == "hang")
        # The engine's state is unknown: later requests fail at once, and the replica's health
        # check (ModelServer.check_health) fails so that Serve replaces it.
        t0 = time.monotonic()
        with pytest.raises(WakeFailed):
            await _request(tier, engine)
        assert time.monotonic() - t0 < 0.1
        await tier.close()

    _run(go())


def test_two_models_on_one_gpu_take_turns_and_every_request_is_served() -> None:
    async def go() -> None:
        book = LeaseBook()
        engines = {m: _fake(m) for m in ("a", "b")}
        tiers = {
            m: await _tier(e, BookLease(book, HolderInfo(m, m, 0.6)), gpu_group="g")
            for m, e in engines.items()
        }
        assert tiers["a"].state is State.ASLEEP or tiers["b"].state is State.ASLEEP  # b's start made a sleep
        peak = 0

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, sum(not e.asleep for e in engines.values()))
                await asyncio.sleep(0.005)

        watcher = asyncio.ensure_future(watch())
        for turn in range(6):
            model = "ab"[turn % 2]
            await asyncio.gather(*(_request(tiers[model], engines[model], 0.05) for _ in range(3)))
        watcher.cancel()
        assert peak == 1
        assert tiers["a"].sleeps["forced"] + tiers["b"].sleeps["forced"] >= 5
        for tier in tiers.values():
            await tier.close()

    _run(go())


def test_a_replica_asked_to_sleep_finishes_its_requests_first() -> None:
    async def go() -> None:
        book = LeaseBook()
        a_engine, b_engine = _fake("a"), _fake("b")
        a = await _tier(a_engine, BookLease(book, HolderInfo("a", "a", 0.6)), gpu_group="g")
        running = asyncio.ensure_future(_request(a, a_engine, hold_s=0.5))
        await asyncio.sleep(0.05)
        b = await _tier(b_engine, BookLease(book, HolderInfo("b", "b", 0.6)), gpu_group="g")
        assert running.done()  # b started only once a's request had finished and a slept
        await running
        assert a.state is State.ASLEEP and a.sleeps["forced"] == 1
        for tier in (a, b):
            await tier.close()

    _run(go())


def test_a_replica_keeps_its_room_through_a_long_engine_start() -> None:
    async def go() -> None:
        book = LeaseBook(lost_after_s=0.3)
        slow, other = _fake("slow", startup_s=3.0), _fake("other")  # past POLL_S + the lost bound
        starting = asyncio.ensure_future(
            _tier(slow, BookLease(book, HolderInfo("slow", "slow", 0.6)), gpu_group="g")
        )
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        second = await _tier(other, BookLease(book, HolderInfo("other", "other", 0.6)), gpu_group="g")
        first = await starting
        assert time.monotonic() - t0 >= 2.9  # it waited for the slow start, then for the sleep
        assert first.state is State.ASLEEP and slow.asleep and book.awake() == {"other": "other"}
        for tier in (first, second):
            await tier.close()

    _run(go())


def test_a_replica_keeps_its_room_while_it_drains_a_long_request() -> None:
    async def go() -> None:
        book = LeaseBook(lost_after_s=0.3)
        a_engine, b_engine = _fake("a"), _fake("b")
        a = await _tier(a_engine, BookLease(book, HolderInfo("a", "a", 0.6)), gpu_group="g")
        running = asyncio.ensure_future(_request(a, a_engine, hold_s=3.0))  # 10x the lost bound
        await asyncio.sleep(0.05)
        b = await _tier(b_engine, BookLease(book, HolderInfo("b", "b", 0.6)), gpu_group="g")
        assert running.done()  # b had to wait for the whole request
        await running
        for tier in (a, b):
            await tier.close()

    _run(go())


def test_a_wake_that_finds_no_room_in_time_fails_with_wake_failed() -> None:
    async def go() -> None:
        book = LeaseBook()
        a_engine, b_engine = _fake("a"), _fake("b")
        b = await _tier(
            b_engine, BookLease(book, HolderInfo("b", "b", 0.6)), gpu_group="g", wake_timeout_s=0.3
        )
        await b.sleep(forced=False)
        a = await _tier(a_engine, BookLease(book, HolderInfo("a", "a", 0.6)), gpu_group="g")
        busy = asyncio.ensure_future(_request(a, a_engine, hold_s=1.5))  # a keeps its room for 1.5 s
        await asyncio.sleep(0.05)
        with pytest.raises(WakeFailed, match=r"no room on its GPU within 0\.3 s"):
            await _request(b, b_engine)
        await busy
        await _request(b, b_engine)  # once a is done, b wakes
        for tier in (a, b):
            await tier.close()

    _run(go())


# Config


def test_warm_tier_config_is_checked() -> None:
    base: dict[str, Any] = {"id": "m", "source": "none"}
    with pytest.raises(ValueError, match="must be shorter than the idle time"):
        ModelConfig(
            **base,
            warm_tier={"sleep_after_idle_s": 120},
            deployment={"autoscaling": {"min_replicas": 0, "downscale_to_zero_delay_s": 60}},
        )
    with pytest.raises(ValueError, match="disagree"):
        ModelConfig(
            **base,
            engine_args={"gpu_memory_utilization": 0.5},
            warm_tier={"sleep_after_idle_s": 1, "gpu_memory_share": 0.6},
        )
    with pytest.raises(ValueError, match="share single GPUs"):
        ModelConfig(**base, num_gpus=2, warm_tier={"sleep_after_idle_s": 1, "gpu_group": "g"})
    model = ModelConfig(
        **base, engine_args={"gpu_memory_utilization": 0.45}, warm_tier={"sleep_after_idle_s": 1}
    )
    assert model.gpu_memory_share == 0.45


def test_a_warm_tier_on_the_cpu_build_of_vllm_is_refused_when_built() -> None:
    from serve_app.engine.vllm.engine import VLLMEngine
    from serve_app.serving.builder import check_warm_tier

    model = ModelConfig(id="m", source="none", num_gpus=0, warm_tier={"sleep_after_idle_s": 1})
    with pytest.raises(ConfigError, match="sleep mode runs on GPUs only"):
        check_warm_tier(model, VLLMEngine)
    check_warm_tier(model.model_copy(update={"engine": "fake"}), FakeEngine)


def test_vllm_gets_sleep_mode_and_its_memory_share() -> None:
    from serve_app.engine.vllm.args import build_namespace

    model = ModelConfig(
        id="m", source="/models/x", num_gpus=0.5, warm_tier={"sleep_after_idle_s": 1, "gpu_memory_share": 0.6}
    )
    ns = build_namespace(model)
    assert ns.enable_sleep_mode is True and ns.gpu_memory_utilization == 0.6


class _SleepyClient:
    """An AsyncLLM stand-in whose sleep takes until `release` is set; generating fails the test."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.errored = False

    async def sleep(self, level: int = 1, mode: str = "abort") -> None:
        assert mode == "wait"  # requests in flight (a probe) finish first
        await self.release.wait()

    async def wake_up(self, tags: list[str] | None = None) -> None:
        await self.release.wait()

    async def check_health(self) -> None:
        pass

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a health probe ran on an engine going to sleep or waking")


def test_no_health_probe_runs_while_the_engine_goes_to_sleep_or_wakes() -> None:
    """On the H200 a probe sent during a replica's first sleep (10 s) waited for a wake that
    never came, failed the health check, and Serve replaced the replica."""
    from serve_app.engine.vllm.engine import VLLMEngine

    async def go() -> None:
        engine = VLLMEngine(ModelConfig(id="m", source="none", num_gpus=1))
        client = engine._client = _SleepyClient()
        sleeping = asyncio.ensure_future(engine.sleep())
        await asyncio.sleep(0.01)
        await engine.check_health()  # while the sleep runs
        client.release.set()
        await sleeping
        client.release.clear()
        waking = asyncio.ensure_future(engine.wake_up())
        await asyncio.sleep(0.01)
        await engine.check_health()  # while the wake runs
        client.release.set()
        await waking
        assert not engine.asleep

    _run(go())
