"""The warm tier of one model replica: its engine sleeps when idle or asked, and wakes for requests.

A replica with `warm_tier` keeps its Serve replica (and its engine's processes) when idle, but
after `sleep_after_idle_s` without a request it puts the engine to sleep (vLLM's sleep mode:
weights to host memory, KV cache dropped), which frees its GPU memory. The next request wakes
it: requests wait meanwhile, before the replica takes them, so the ingress holds them as it does
at zero replicas, and a wake that fails or finds no room within `wake_timeout_s` fails them with
`WakeFailed` (503 with Retry-After). Removal after a longer idle time stays with autoscaling.

With a `gpu_group`, the replica holds a lease on its GPU while awake (serve_app.serving.gpu_lease):
waking takes the lease first, which may ask other models' replicas to sleep, and a replica asked
to sleep lets the requests it runs finish, takes no new ones, and sleeps.

One transition (a wake or a sleep) runs at a time; requests that arrive meanwhile wait for it,
and every request that waited on a wake fails with it if it fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Coroutine
from typing import Any, Protocol

from serve_app.config import WarmTierOptions
from serve_app.engine.protocol import Engine
from serve_app.serving.gpu_lease import POLL_S, Lease

logger = logging.getLogger("ray.serve")

LEASE_RETRY_S = 1.0  # after a failed call to the lease keeper
START_LOG_S = 30.0  # how often a replica waiting for room to start says so


class WakeFailed(Exception):
    """A request's model could not wake (no room on its GPU in time, or the engine failed)."""


class WarmMetrics(Protocol):
    def awake(self, awake: bool) -> None: ...

    def woke(self, seconds: float) -> None: ...

    def slept(self, forced: bool) -> None: ...


class NoMetrics:
    def awake(self, awake: bool) -> None:
        pass

    def woke(self, seconds: float) -> None:
        pass

    def slept(self, forced: bool) -> None:
        pass


class State(enum.Enum):
    AWAKE = "awake"
    ASLEEP = "asleep"


class WarmTier:
    """Sleeps and wakes one replica's engine; `enter`/`leave` bracket each request."""

    def __init__(
        self,
        model_id: str,
        engine: Engine,
        options: WarmTierOptions,
        lease: Lease | None = None,
        metrics: WarmMetrics | None = None,
    ) -> None:
        self.model_id = model_id
        self._engine = engine
        self._options = options
        self._lease = lease
        self._metrics = metrics or NoMetrics()
        self.state = State.AWAKE
        self._draining = False  # a sleep waits for the requests in flight: take no new ones
        self._waking = False  # a wake holds (or waits for) its lease
        self._transition: asyncio.Future[None] | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._last_used = time.time()
        self._tasks: list[asyncio.Task[None]] = []
        self.fatal: str | None = None  # the engine failed to sleep or wake: replace the replica
        self._engine_started = asyncio.Event()  # a request to sleep waits for the engine's start
        self.wakes = 0
        self.sleeps = {"idle": 0, "forced": 0}

    async def before_start(self) -> None:
        """Take this replica's share of its GPU before its engine starts (the engine's memory
        is allocated awake); waits as long as it takes to make room, saying so. From then on
        the replica polls its lease (its heartbeat), through the engine's start too."""
        if self._lease is None:
            return
        acquire = asyncio.ensure_future(self._lease.acquire())
        started = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(acquire), timeout=START_LOG_S)
                break
            except TimeoutError:
                logger.info(
                    "model %s: waiting %.0f s for room on its GPU to start",
                    self.model_id,
                    time.monotonic() - started,
                )
        self._spawn(self._sleep_when_asked())

    def run(self) -> None:
        """The engine has started: watch for idleness, and sleep when asked (with a lease)."""
        self._metrics.awake(True)
        self._last_used = time.time()  # idle from now, not from before the engine's start
        self._engine_started.set()
        self._spawn(self._sleep_when_idle())

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in the background until it ends or `close` cancels it."""
        self._tasks = [task for task in self._tasks if not task.done()]
        self._tasks.append(asyncio.create_task(work))

    def report(self) -> None:
        """Set the awake gauge again (Ray drops a gauge value that is not set within two export
        periods; the replica calls this every GAUGE_PERIOD_S)."""
        if self._engine_started.is_set():
            self._metrics.awake(self.state is State.AWAKE)

    async def enter(self) -> None:
        """Wait until the engine is awake (waking it if it sleeps); then count one request in."""
        while self.state is not State.AWAKE or self._draining:
            if self.fatal:
                raise WakeFailed(self.fatal)
            task = self._transition
            if task is None or task.done():
                task = self._transition = asyncio.ensure_future(self._wake())
            # Shielded: a client that leaves does not stop the wake for the others.
            await asyncio.shield(task)
        self._in_flight += 1
        self._idle.clear()
        self._last_used = time.time()

    def leave(self) -> None:
        """One request ended."""
        self._in_flight -= 1
        self._last_used = time.time()
        if self._in_flight == 0:
            self._idle.set()

    async def _wake(self) -> None:
        self._waking = True
        try:
            await self._wake_engine()
        finally:
            self._waking = False

    async def _wake_engine(self) -> None:
        started = time.monotonic()
        if self._lease is not None:
            try:
                await asyncio.wait_for(self._lease.acquire(), timeout=self._options.wake_timeout_s)
            except TimeoutError:
                raise WakeFailed(
                    f"no room on its GPU within {self._options.wake_timeout_s:g} s: the models awake "
                    "there are still serving"
                ) from None
        try:
            await asyncio.wait_for(self._engine.wake_up(), timeout=self._options.wake_timeout_s)
        except Exception as exc:
            # Its memory may be partly back: keep the share, and let the replica be replaced.
            timed_out = isinstance(exc, TimeoutError)
            self.fatal = "the engine did not wake in time" if timed_out else "the engine failed to wake"
            logger.error("model %s: %s (%r); the replica will be replaced", self.model_id, self.fatal, exc)
            raise WakeFailed(self.fatal) from exc
        self.state = State.AWAKE
        self._last_used = time.time()  # the requests that waited have yet to enter
        self.wakes += 1
        seconds = time.monotonic() - started
        self._metrics.woke(seconds)
        logger.info("model %s: awake in %.2f s", self.model_id, seconds)

    async def sleep(self, forced: bool) -> None:
        """Put the engine to sleep once the requests in flight have finished (none are taken
        meanwhile); `forced`: asked to, to make room for another model. Never raises."""
        while True:
            task = self._transition
            if task is None or task.done():
                break
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
        if self.state is not State.AWAKE or self.fatal:
            if forced and self._lease is not None and not self.fatal:
                self._spawn(self._release())  # the book may think it awake
            return
        task = self._transition = asyncio.ensure_future(self._sleep(forced))
        await asyncio.shield(task)

    async def _sleep(self, forced: bool) -> None:
        self._draining = True
        try:
            await self._idle.wait()
            started = time.monotonic()
            try:
                await self._engine.sleep()
            except Exception as exc:  # in what state the engine is, nobody knows
                self.fatal = "the engine failed to sleep"
                logger.error(
                    "model %s: %s (%r); the replica will be replaced", self.model_id, self.fatal, exc
                )
                return
            self.state = State.ASLEEP
        finally:
            self._draining = False
        reason = "forced" if forced else "idle"
        self.sleeps[reason] += 1
        self._metrics.slept(forced)
        logger.info("model %s: asleep (%s) in %.2f s", self.model_id, reason, time.monotonic() - started)
        if self._lease is not None:
            self._spawn(self._release())  # the transition ends now, even while the keeper is away

    async def _release(self) -> None:
        assert self._lease is not None
        while True:
            try:
                await self._lease.release()
                return
            except Exception as exc:  # the lease keeper restarts: it will learn from our polls
                logger.warning("model %s: cannot release its GPU lease: %r", self.model_id, exc)
                await asyncio.sleep(LEASE_RETRY_S)

    async def _sleep_when_idle(self) -> None:
        after = self._options.sleep_after_idle_s
        period = min(1.0, after / 4)
        while True:
            await asyncio.sleep(period)
            idle_s = time.time() - self._last_used
            if self.state is State.AWAKE and self._in_flight == 0 and idle_s >= after and not self.fatal:
                logger.info("model %s: idle for %.0f s; sleeping", self.model_id, idle_s)
                await self.sleep(forced=False)

    async def _sleep_when_asked(self) -> None:
        """Poll the lease, and sleep when asked. The polls are the replica's heartbeat: they go
        on while the engine starts, drains its requests or sleeps (a holder that stops polling
        is taken for gone, and its room given to another while its memory is still in use)."""
        assert self._lease is not None
        sleeping: asyncio.Task[None] | None = None
        while True:
            try:
                awake = self.state is State.AWAKE or self._waking
                asked = await self._lease.must_sleep(awake, self._last_used)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("model %s: cannot reach its GPU lease: %r", self.model_id, exc)
                await asyncio.sleep(LEASE_RETRY_S)
                continue
            if not asked:
                continue
            if sleeping is None or sleeping.done():
                sleeping = asyncio.create_task(self._sleep_once_started())
                self._tasks.append(sleeping)
            # The poll answers at once while asked: look again within POLL_S.
            await asyncio.wait({sleeping}, timeout=POLL_S)

    async def _sleep_once_started(self) -> None:
        await self._engine_started.wait()
        await self.sleep(forced=True)

    async def close(self) -> None:
        """Stop watching and give the lease back: the replica stops, and its engine has shut
        down (its memory is free)."""
        tasks = [*self._tasks, *([self._transition] if self._transition is not None else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        if self._lease is not None:
            with contextlib.suppress(Exception):
                await self._lease.leave()
