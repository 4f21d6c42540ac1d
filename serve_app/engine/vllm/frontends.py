"""A replica whose one vLLM engine core is served by N frontend processes.

With one frontend, the replica runs vLLM's `AsyncLLM` itself (`VLLMEngine`), and under load its
one Python process is the cap: vLLM's output processing and detokenization, its OpenAI chunk
formatting and Serve's messages share one core. `vllm serve --api-server-count N` spreads that
work over N API server processes on one engine core; this engine does the same (the core
started by vLLM's own launcher, the frontends by `compat.launch_with_frontends`), and each
frontend process runs a whole `VLLMEngine` on the shared core
(serve_app.engine.vllm.frontend_process), so every request gets the same checks and answers.

The replica owns it all: it starts the engine core and the frontends and stops them; it sends
each request to the frontend with the fewest requests and relays the answer; Serve's health
check and the load that autoscaling reads come from here, over all frontends. A client that
leaves closes its relay, which cancels the request in its frontend. If the replica is killed,
its reaper (serve_app.serving.reaper) kills the processes, and the frontends end by
themselves once their parent is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from serve_app.config import ModelConfig
from serve_app.engine.protocol import AdapterRef, Engine, EngineStats, Head, ModelInfo, Route, Usage
from serve_app.engine.vllm import compat, wire
from serve_app.engine.vllm.args import (
    build_namespace,
    check_source,
    engine_args,
    sleep_unsupported,
    validate_engine_args,
)
from serve_app.engine.vllm.engine import PROBE_TIMEOUT_S, Load, SleepGuard, StallWatch, alive
from serve_app.engine.vllm.frontend_process import SPEC_ATTRIBUTE, FrontendSpec, run_frontend
from serve_app.guards.adapters import AdapterError

logger = logging.getLogger(__name__)

LOAD_PERIOD_S = 0.5  # how often the frontends' view of the engine's load is read
CALL_TIMEOUT_S = 30.0  # a frontend answers a health or load call within this
ADAPTER_TIMEOUT_S = 300.0  # an adapter loads (from a Hugging Face repository, maybe) within this
SLEEP_TIMEOUT_S = 600.0  # the engine core moves its weights to host memory and back within this
READY_TIMEOUT_S = 600.0  # frontends start with the engine core; vLLM waits as long for it


@dataclass
class Frontend:
    """One frontend process, as the replica sees it."""

    index: int
    path: str  # its Unix socket
    pid: int
    in_flight: int = 0  # requests this replica has sent it and not yet seen end
    load: Load | None = field(default=None)  # its view of the engine's load, as last read


class FrontendRelay:
    """Sends requests and calls to frontend processes and reads their answers; knows the load
    over all of them. It holds no process: `VLLMFrontends` starts and stops those."""

    def __init__(self, frontends: list[Frontend]) -> None:
        self.frontends = frontends
        self._open: set[asyncio.StreamWriter] = set()  # the connections of requests in flight

    async def handle(self, route: Route, body: bytes, request_id: str) -> AsyncIterator[Head | bytes | Usage]:
        """Relay one request through the frontend with the fewest requests."""
        frontend = min(self.frontends, key=lambda f: f.in_flight)
        frontend.in_flight += 1
        writer: asyncio.StreamWriter | None = None
        try:
            reader, writer = await asyncio.open_unix_connection(frontend.path)
            self._open.add(writer)
            writer.write(wire.item_frame(wire.Call("handle", (route.value, body, request_id))))
            while True:
                try:
                    item = await wire.read_item(reader)
                except wire.End:
                    return
                yield item
        except asyncio.IncompleteReadError:
            raise RuntimeError(f"frontend {frontend.index} went away mid-request") from None
        finally:
            frontend.in_flight -= 1
            if writer is not None:
                self._open.discard(writer)
                writer.close()  # a client that left: the frontend cancels the request

    def fail_all(self) -> None:
        """End every request in flight with an error (the engine is gone): their frontends
        would wait for ever on an engine core that died."""
        for writer in list(self._open):
            writer.close()

    async def call(
        self, frontend: Frontend, op: str, timeout_s: float = CALL_TIMEOUT_S, args: tuple[Any, ...] = ()
    ) -> Any:
        """One call to `frontend` and its result, within `timeout_s`."""

        async def call() -> Any:
            reader, writer = await asyncio.open_unix_connection(frontend.path)
            try:
                writer.write(wire.item_frame(wire.Call(op, args)))
                return await wire.read_item(reader)
            finally:
                writer.close()

        return await asyncio.wait_for(call(), timeout=timeout_s)

    async def call_all(
        self, op: str, timeout_s: float = CALL_TIMEOUT_S, args: tuple[Any, ...] = ()
    ) -> list[Any]:
        return list(await asyncio.gather(*(self.call(f, op, timeout_s, args) for f in self.frontends)))

    async def read_loads(self) -> None:
        """Ask each frontend for its view of the engine's load."""
        loads = await asyncio.gather(*(self.call(f, "load") for f in self.frontends), return_exceptions=True)
        for frontend, load in zip(self.frontends, loads, strict=True):
            if isinstance(load, Load):
                frontend.load = load

    def engine_load(self) -> Load | None:
        """The freshest view of the engine's scheduler among the frontends (the engine core
        sends its scheduler's figures to one client per step)."""
        loads = [f.load for f in self.frontends if f.load is not None]
        return max(loads, key=lambda load: load.last_step, default=None)

    def stats(self) -> EngineStats:
        """The load at once: the requests this replica relays, and the scheduler's figures as
        last read."""
        return self._stats(sum(f.in_flight for f in self.frontends))

    async def current_stats(self) -> EngineStats:
        """The load as the frontends' engines hold it now."""
        await self.read_loads()
        return self._stats(sum(f.load.in_flight for f in self.frontends if f.load is not None))

    def _stats(self, in_flight: int) -> EngineStats:
        load = self.engine_load()
        if load is None:
            return EngineStats(in_flight=in_flight)
        # Each step's prefix-cache counts reached one frontend: their sum is the engine's.
        loads = [f.load for f in self.frontends if f.load is not None]
        prefix = (sum(x.prefix_cache_queries for x in loads), sum(x.prefix_cache_hits for x in loads))
        return load.stats(in_flight, prefix)

    @property
    def busy(self) -> bool:
        return any(f.in_flight for f in self.frontends)


class VLLMFrontends(Engine):
    """One engine core, `config.frontend_count` frontend processes, and the relay to them."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self._launch: compat.FrontendLaunch | None = None
        self._relay = FrontendRelay([])
        self._core_pids: list[int] = []
        self._socket_dir: str | None = None
        self._info: ModelInfo | None = None
        self._stall = StallWatch()
        self._poller: asyncio.Task[None] | None = None
        self._probes = 0
        self._sleep = SleepGuard()

    @classmethod
    def validate(cls, config: ModelConfig) -> None:
        validate_engine_args(config)

    @classmethod
    def sleep_unsupported(cls, config: ModelConfig) -> str | None:
        return sleep_unsupported(config)

    async def sleep(self) -> None:
        """Sleep the one engine core through one frontend (every frontend is a client of that
        core); the others then drop their cache of what the core has seen of images."""
        first, *others = self._relay.frontends
        await self._sleep.sleep(lambda: self._relay.call(first, "sleep", timeout_s=SLEEP_TIMEOUT_S))
        resets = await asyncio.gather(
            *(self._relay.call(f, "reset_mm_cache") for f in others), return_exceptions=True
        )
        for error in (r for r in resets if isinstance(r, BaseException)):
            # The core sleeps all the same; a stale image cache costs a frontend a resend at worst.
            logger.warning("model %s: a frontend did not reset its image cache: %r", self.config.id, error)

    async def wake_up(self) -> None:
        first = self._relay.frontends[0]
        await self._sleep.wake_up(lambda: self._relay.call(first, "wake_up", timeout_s=SLEEP_TIMEOUT_S))

    @property
    def asleep(self) -> bool:
        return self._sleep.asleep

    async def start(self) -> None:
        check_source(self.config)
        count = self.config.frontend_count
        self._socket_dir = tempfile.mkdtemp(prefix="mistral-serve-frontends-")  # mode 0700
        spec = FrontendSpec(self.config, self.limits, self._socket_dir)
        ns = build_namespace(self.config)
        setattr(ns, SPEC_ATTRIBUTE, spec)
        args = engine_args(ns)
        args._api_process_count, args._api_process_rank = count, -1
        # Spawn the engine core, as `vllm serve` does (vLLM forks it outside Ray and its CLI).
        os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        from vllm.usage.usage_lib import UsageContext

        vllm_config = args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        logger.info("model %s: starting its engine core and %d frontend processes", self.config.id, count)
        launch = await asyncio.to_thread(
            compat.launch_with_frontends,
            vllm_config,
            not args.disable_log_stats,
            ns,
            count,
            run_frontend,
            self._socket_dir,
        )
        self._launch = launch
        self._core_pids = compat.manager_pids(launch.engine_manager)
        self._relay = FrontendRelay(
            [Frontend(i, str(spec.socket_path(i)), int(p.pid)) for i, p in enumerate(launch.frontends)]
        )
        await asyncio.gather(*(_wait_ready(f) for f in self._relay.frontends))
        self._info = await self._relay.call(self._relay.frontends[0], "info")
        await self._relay.read_loads()
        self._poller = asyncio.create_task(self._poll_loads())

    def info(self) -> ModelInfo:
        if self._info is None:
            raise RuntimeError("the engine has not been started")
        return self._info

    def handle(self, route: Route, body: bytes, request_id: str) -> AsyncIterator[Head | bytes | Usage]:
        return self._relay.handle(route, body, request_id)

    async def add_adapter(self, adapter: AdapterRef) -> None:
        """Every frontend names the adapter (the engine core loads it once: one id)."""
        results = await self._relay.call_all("add_adapter", ADAPTER_TIMEOUT_S, (adapter,))
        if (failed := next((r for r in results if isinstance(r, AdapterError)), None)) is not None:
            await self.remove_adapter(adapter)
            raise failed

    async def remove_adapter(self, adapter: AdapterRef) -> None:
        await self._relay.call_all("remove_adapter", CALL_TIMEOUT_S, (adapter,))

    async def _poll_loads(self) -> None:
        """Read the frontends' load every LOAD_PERIOD_S; once a process of the engine has died,
        fail the requests in flight at once (the replica then ends itself, see
        serve_app.serving.server), rather than at the next health check."""
        while True:
            await asyncio.sleep(LOAD_PERIOD_S)
            if self.dead():
                self._relay.fail_all()
                continue
            try:
                await self._relay.read_loads()
            except Exception as exc:  # never let metrics stop a replica
                logger.warning("model %s: cannot read the frontends' load: %r", self.config.id, exc)

    def stats(self) -> EngineStats:
        return self._relay.stats()

    async def current_stats(self) -> EngineStats:
        return await self._relay.current_stats()

    async def facts(self) -> list[dict[str, Any]]:
        """Each frontend's process id, requests, the vLLM fixes in place there, and its image bound."""
        return await self._relay.call_all("facts")

    async def check_health(self) -> None:
        """Every frontend passes vLLM's own check; the engine core made a step lately when
        busy, or generates a token when idle (through each frontend in turn)."""
        if self.dead():
            raise RuntimeError("a process of the engine has died")
        await self._relay.call_all("alive")
        if self.asleep:
            return  # a parked engine generates nothing until woken
        load = self._relay.engine_load()
        if self._stall.needs_probe(self._relay.busy, load.last_step if load else time.monotonic()):
            frontends = self._relay.frontends
            frontend = frontends[self._probes % len(frontends)]
            self._probes += 1
            await self._sleep.probe(
                lambda: asyncio.wait_for(self._relay.call(frontend, "probe"), timeout=PROBE_TIMEOUT_S + 5)
            )

    def dead(self) -> bool:
        """Whether the engine core or a frontend process has died: the replica is then replaced
        (one frontend's death would leave its share of requests failing)."""
        if self._launch is None:
            return False
        return not all(alive(pid) for pid in [*self._core_pids, *(f.pid for f in self._relay.frontends)])

    @property
    def core_pids(self) -> list[int]:
        return list(self._core_pids)

    async def shutdown(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._launch is not None:
            await asyncio.to_thread(self._launch.shutdown)
            self._launch = None
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)


async def _wait_ready(frontend: Frontend) -> None:
    """A frontend binds its socket once its engine has started."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        try:
            _, writer = await asyncio.open_unix_connection(frontend.path)
        except (FileNotFoundError, ConnectionError):
            if not alive(frontend.pid):
                raise RuntimeError(f"frontend {frontend.index} ended while starting; see its log") from None
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"frontend {frontend.index} not ready in {READY_TIMEOUT_S:.0f} s"
                ) from None
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return
