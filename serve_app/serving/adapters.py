"""LoRA adapters on a model's replicas: loaded on first use, evicted least recently used past the
replica's `lora.max_adapters_per_replica`, and announced to the routers.

A request for an adapter carries its `AdapterSpec` from the ingress (the config's adapters and
those added at run time alike), and Serve's multiplexed model id (the spec's `key`), by which
the model's request router (serve_app.serving.routing) sends it to a replica that holds the
adapter. Each replica keeps its adapters in an `AdapterCache`: one load per adapter however many
requests wait for it, least recently used out first past the cap, never one that a request is
using (it leaves once the last such request ends). Each change of what a replica holds is
reported to Serve's controller, which tells the routers (serve_app.serving.ray_compat).

Before the engine sees an adapter, the replica checks where it comes from and what it is
(serve_app.guards.adapters), and gives this load of it an id of its own (vLLM's lora_int_id):
every frontend of the replica's engine names the same weights by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from serve_app.config import ModelConfig
from serve_app.engine.protocol import AdapterRef, Engine
from serve_app.guards.adapters import AdapterError, inspect_adapter, is_local, resolve_source
from serve_app.models.shapes import model_shapes
from serve_app.serving.telemetry import AdapterMetrics

logger = logging.getLogger("ray.serve")
T = TypeVar("T")


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter as the ingress routes to it and a replica loads it."""

    name: str  # what clients send as `model`
    base: str  # the id of the model it adapts
    source: str  # as configured or given to the admin route (checked again where it loads)
    revision: int = 0  # 0: from the config; n: the n-th adapter added at run time
    aliases: tuple[str, ...] = ()  # other names of it (from the config)

    @property
    def key(self) -> str:
        """Serve's multiplexed model id of this adapter: a runtime adapter added again under the
        same name is another one (another source), which no replica holds yet."""
        return self.name if self.revision == 0 else f"{self.name}@{self.revision}"

    @property
    def from_config(self) -> bool:
        return self.revision == 0


class AdapterCache(Generic[T]):
    """Loaded values by key, least recently used first out past `capacity`, never one in use.

    `hold(key)` loads the key's value once however many callers wait for it, marks it most
    recently used, and keeps it from eviction until the caller is done. Evictions run in a task
    of their own: a caller that is cancelled (its client left) never cuts an unload short.
    `on_change(keys)` hears the keys loaded or loading after each change."""

    def __init__(
        self,
        capacity: int,
        load: Callable[[str], Awaitable[T]],
        unload: Callable[[str, T], Awaitable[None]],
        on_change: Callable[[list[str]], None] = lambda keys: None,
    ) -> None:
        self.capacity = capacity
        self._load, self._unload, self._on_change = load, unload, on_change
        self._loaded: OrderedDict[str, T] = OrderedDict()
        self._loading: dict[str, asyncio.Future[None]] = {}
        self._pins: Counter[str] = Counter()
        self._evicting: asyncio.Task[None] | None = None

    def keys(self) -> list[str]:
        """Loaded keys, least recently used first."""
        return list(self._loaded)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[bool]:
        """Hold `key`'s value loaded while the block runs; yields whether it was loaded already."""
        self._pins[key] += 1
        try:
            held = key in self._loaded
            if held:
                self._loaded.move_to_end(key)
            else:
                await self._ensure(key)
                self._schedule_eviction()  # make room now (this key is pinned)
            yield held
        finally:
            self._pins[key] -= 1
            if not self._pins[key]:
                del self._pins[key]
            self._schedule_eviction()

    async def settled(self) -> None:
        """Wait for the evictions under way (tests, diagnostics)."""
        while self._evicting is not None and not self._evicting.done():
            await asyncio.shield(self._evicting)

    def _schedule_eviction(self) -> None:
        if len(self._loaded) > self.capacity and (self._evicting is None or self._evicting.done()):
            self._evicting = asyncio.ensure_future(self._evict())

    async def _ensure(self, key: str) -> None:
        """Load `key` (or wait for its load under way). The load runs on its own: a caller that
        leaves does not cancel it for the others."""
        task = self._loading.get(key)
        if task is None:
            task = self._loading[key] = asyncio.ensure_future(self._load_into(key))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved: no warning
            self._changed()
        await asyncio.shield(task)

    async def _load_into(self, key: str) -> None:
        try:
            self._loaded[key] = await self._load(key)
        finally:
            del self._loading[key]
            self._changed()

    async def _evict(self) -> None:
        """Unload the least recently used unpinned values while over capacity."""
        while len(self._loaded) > self.capacity:
            victim = next((k for k in self._loaded if not self._pins[k]), None)
            if victim is None:
                return  # all in use: the next release evicts
            value = self._loaded.pop(victim)
            self._changed()
            try:
                await self._unload(victim, value)
            except Exception as exc:  # the value is out of the cache all the same
                logger.warning("unloading %s failed: %r", victim, exc)

    def _changed(self) -> None:
        self._on_change([*self._loaded, *self._loading])


class HolderReport:
    """Reports what a replica holds to Serve's controller, latest state first, one call at a
    time, off the event loop (the request path never waits for it)."""

    def __init__(self, report: Callable[[list[str]], bool]) -> None:
        self._report = report
        self._latest: list[str] | None = None
        self._task: asyncio.Task[None] | None = None

    def changed(self, keys: list[str]) -> None:
        self._latest = keys
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        while self._latest is not None:
            keys, self._latest = self._latest, None
            try:
                await asyncio.to_thread(self._report, keys)
            except Exception as exc:  # routing falls back to the adapter's ranking meanwhile
                logger.warning("cannot report the adapters held here: %r", exc)


class ReplicaAdapters:
    """The adapters of one replica: a request for an adapter runs in `use(spec)`."""

    def __init__(
        self,
        config: ModelConfig,
        engine: Engine,
        metrics: AdapterMetrics | None = None,
        report: Callable[[list[str]], bool] | None = None,
    ) -> None:
        lora = config.lora_options
        if lora is None:
            raise ValueError(f"model '{config.id}' has no `lora` options")
        self._config = config
        self._lora = lora
        self._engine = engine
        self._ids = itertools.count(1)
        self._specs: dict[str, AdapterSpec] = {}  # by key: the spec the next load of a key reads
        self._shapes = model_shapes(config.source)
        self._metrics = metrics
        self.counts = {"held": 0, "loaded": 0, "failed": 0}  # requests, by outcome
        reporter = HolderReport(report) if report is not None else None
        self._cache: AdapterCache[AdapterRef] = AdapterCache(
            lora.adapters_per_replica,
            self._load,
            self._unload,
            reporter.changed if reporter else lambda k: None,
        )

    @contextlib.asynccontextmanager
    async def use(self, spec: AdapterSpec) -> AsyncIterator[None]:
        """Hold `spec` loaded here while the block runs; AdapterError if it cannot load."""
        if spec.base != self._config.id:
            raise AdapterError(400, f"adapter '{spec.name}' is not one of model '{self._config.id}'")
        self._specs.setdefault(spec.key, spec)
        try:
            async with self._cache.hold(spec.key) as held:
                self._count("held" if held else "loaded")
                yield
        except AdapterError:
            self._count("failed")
            raise

    def _count(self, outcome: str) -> None:
        self.counts[outcome] += 1
        if self._metrics is not None:
            self._metrics.request(outcome)

    async def check(self, spec: AdapterSpec) -> None:
        """Check an adapter's source and files as a load would, loading nothing (admin route)."""
        await asyncio.to_thread(self._checked_path, spec)

    def _checked_path(self, spec: AdapterSpec) -> str:
        path = resolve_source(spec.source, self._lora.source_dirs, from_config=spec.from_config)
        if is_local(path):
            base_names = (*self._config.names, self._config.source) if self._lora.check_base_name else ()
            inspect_adapter(
                path, max_rank=self._lora.max_lora_rank, shapes=self._shapes, base_names=base_names
            )
        return path

    async def _load(self, key: str) -> AdapterRef:
        spec = self._specs.pop(key)
        path = await asyncio.to_thread(self._checked_path, spec)
        ref = AdapterRef(spec.name, path, next(self._ids), spec.aliases)
        started = time.perf_counter()
        await self._engine.add_adapter(ref)
        seconds = time.perf_counter() - started
        logger.info("adapter %s of %s: loaded in %.3f s", spec.name, self._config.id, seconds)
        if self._metrics is not None:
            self._metrics.loaded(seconds)
        return ref

    async def _unload(self, key: str, ref: AdapterRef) -> None:
        try:
            await self._engine.remove_adapter(ref)
            logger.info("adapter %s of %s: unloaded", ref.name, self._config.id)
        except Exception as exc:  # an engine that is gone holds nothing any more
            logger.warning("adapter %s: unload failed: %r", ref.name, exc)

    def held(self) -> list[str]:
        """The keys of the adapters loaded here, least recently used first."""
        return self._cache.keys()

    async def settled(self) -> None:
        """Wait for the evictions under way."""
        await self._cache.settled()
