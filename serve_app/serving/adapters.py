"""LoRA adapters on a model's replicas: loaded on first use, evicted least recently used past the
replica's `lora.max_adapters_per_replica`, and announced to the routers.

A request for an adapter carries its `AdapterSpec` from the ingress (the config's adapters and
those added at run time alike), and Serve's multiplexed model id (the spec's `key`). The replica
loads the adapter through Serve's model multiplexing (`serve.multiplexed`): it keeps the
replica's adapters in least-recently-used order, unloads the oldest past the cap, and tells
Serve's controller which adapters each replica holds; the model's request router
(serve_app.serving.routing) sends each adapter's requests to replicas that hold it. Serve also
exports the loads, unloads and load times (`ray_serve_multiplexed_*` metrics).

Before the engine sees an adapter, the replica checks where it comes from and what it is
(serve_app.guards.adapters), and gives this load of it an id of its own (vLLM's lora_int_id):
every frontend of the replica's engine names the same weights by it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass

from serve_app.config import ModelConfig
from serve_app.engine.protocol import AdapterRef, Engine
from serve_app.guards.adapters import AdapterError, inspect_adapter, is_local, model_shapes, resolve_source
from serve_app.serving.telemetry import AdapterMetrics

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter as the ingress routes to it and a replica loads it."""

    name: str  # what clients send as `model`
    base: str  # the id of the model it adapts
    source: str  # as configured or given to the admin route (checked again where it loads)
    revision: int = 0  # 0: from the config; n: the n-th adapter added at run time

    @property
    def key(self) -> str:
        """Serve's multiplexed model id of this adapter: a runtime adapter added again under the
        same name is another one (another source), which no replica holds yet."""
        return self.name if self.revision == 0 else f"{self.name}@{self.revision}"

    @property
    def from_config(self) -> bool:
        return self.revision == 0


class LoadedAdapter:
    """One adapter loaded in a replica's engine; Serve's multiplexing calls `__del__` when it
    evicts it (or the replica stops)."""

    def __init__(self, engine: Engine, ref: AdapterRef, held: set[str], key: str) -> None:
        self.engine = engine
        self.ref = ref
        self._held, self._key = held, key

    async def __del__(self) -> None:  # Serve awaits it on eviction
        self._held.discard(self._key)
        try:
            await self.engine.remove_adapter(self.ref)
            logger.info("adapter %s unloaded", self.ref.name)
        except Exception as exc:  # the engine is gone: nothing is held any more
            logger.warning("adapter %s: unload failed: %r", self.ref.name, exc)


class ReplicaAdapters:
    """The adapters of one replica: `use(spec)` before a request for it reaches the engine."""

    def __init__(self, config: ModelConfig, engine: Engine, metrics: AdapterMetrics | None = None) -> None:
        lora = config.lora_options
        if lora is None:
            raise ValueError(f"model '{config.id}' has no `lora` options")
        self._config = config
        self._lora = lora
        self._engine = engine
        self._ids = itertools.count(1)
        self._specs: dict[str, AdapterSpec] = {}  # by key: what the next load of each key reads
        self._shapes = model_shapes(config.source)
        self._held: set[str] = set()
        self._metrics = metrics
        self.counts = {"held": 0, "loaded": 0, "failed": 0}  # requests, by outcome
        from ray import serve

        async def load(key: str) -> LoadedAdapter:
            return await self._load(key)

        # Serve keeps one multiplexing wrapper per function object: this replica's own.
        self._multiplexed = serve.multiplexed(max_num_models_per_replica=lora.adapters_per_replica)(load)

    async def use(self, spec: AdapterSpec) -> None:
        """Have `spec` loaded here (marked most recently used); AdapterError if it cannot load."""
        if spec.base != self._config.id:
            raise AdapterError(400, f"adapter '{spec.name}' is not one of model '{self._config.id}'")
        self._specs[spec.key] = spec
        outcome = "held" if spec.key in self._held else "loaded"
        try:
            await self._multiplexed(spec.key)
        except Exception:
            outcome = "failed"
            raise
        finally:
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

    async def _load(self, key: str) -> LoadedAdapter:
        spec = self._specs.pop(key)
        path = await asyncio.to_thread(self._checked_path, spec)
        ref = AdapterRef(spec.name, path, next(self._ids))
        started = time.perf_counter()
        await self._engine.add_adapter(ref)
        seconds = time.perf_counter() - started
        logger.info("adapter %s of %s: loaded in %.3f s", spec.name, self._config.id, seconds)
        if self._metrics is not None:
            self._metrics.loaded(seconds)
        self._held.add(key)
        return LoadedAdapter(self._engine, ref, self._held, key)

    def held(self) -> list[str]:
        """The keys of the adapters loaded here."""
        return sorted(self._held)
