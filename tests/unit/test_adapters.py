"""LoRA adapters without a cluster: the config, the checks of sources and files, the replica's
cache and its eviction, the routing to holders, the catalog and the book of runtime adapters."""

from __future__ import annotations

import asyncio
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from ray.serve._private.common import DeploymentID, ReplicaID, RequestMetadata
from ray.serve.request_router import PendingRequest

from serve_app.config import AppConfig, ModelConfig
from serve_app.engine.fake import FakeEngine
from serve_app.engine.protocol import AdapterRef
from serve_app.guards.adapters import AdapterError, inspect_adapter, resolve_source
from serve_app.models import adapters as demo_adapters
from serve_app.models.shapes import ModelShapes, model_shapes
from serve_app.serving.adapter_registry import AdapterRegistry
from serve_app.serving.adapters import AdapterCache, AdapterSpec, ReplicaAdapters
from serve_app.serving.routing import adapter_order, rank, router_config
from tests.conftest import ROOT
from tests.support.routers import affinity_router

DEMO = ROOT / "models" / "adapters"
V3 = "tiny-mistral-v3"


def _model(**extra: Any) -> dict[str, Any]:
    return {"id": "m", "source": "./x", **extra}


# --- config ---------------------------------------------------------------------------------


def test_adapters_turn_lora_on_with_vllms_defaults() -> None:
    model = ModelConfig(**_model(adapters=[{"name": "m-a", "source": "./a"}]))
    assert model.lora_options is not None and model.lora_options.adapters_per_replica == 1
    assert ModelConfig(**_model()).lora_options is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"adapters": [{"name": "a", "source": "./a"}, {"name": "a", "source": "./b"}]}, "used twice"),
        ({"adapters": [{"name": "m", "source": "./a"}]}, "model's own name"),
        ({"adapters": [{"name": "../x", "source": "./a"}]}, "pattern"),
        ({"lora": {}, "engine_args": {"max_loras": 4}}, "set by `lora`"),
        ({"lora": {"max_lora_rank": 12}}, "max_lora_rank of 1, 8, 16"),
        ({"lora": {"max_loras": 4, "max_adapters_per_replica": 2}}, "at least max_loras"),
    ],
)
def test_bad_adapter_configs_are_refused(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelConfig(**_model(**extra))


def test_an_adapter_may_not_take_another_models_name() -> None:
    models = [_model(), {"id": "n", "source": "./y", "adapters": [{"name": "m", "source": "./a"}]}]
    with pytest.raises(ValidationError, match="used twice"):
        AppConfig(models=models)


# --- sources and files ----------------------------------------------------------------------


def test_local_sources_must_lie_in_the_source_dirs(tmp_path: Path) -> None:
    allowed = tmp_path / "adapters"
    (allowed / "a").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    os.symlink(tmp_path / "secret", allowed / "link")
    dirs = [str(allowed)]
    assert resolve_source(str(allowed / "a"), dirs, from_config=False) == str(allowed / "a")
    for escape in (
        str(allowed / ".." / "secret"),
        str(allowed / "link"),
        "/etc",
        str(tmp_path / "adapters2"),
    ):
        with pytest.raises(AdapterError) as err:
            resolve_source(escape, dirs, from_config=False)
        assert err.value.status == 403
    # Without source_dirs: the config's own local sources, none at run time.
    assert resolve_source(str(tmp_path / "secret"), [], from_config=True) == str(tmp_path / "secret")
    with pytest.raises(AdapterError, match=r"no lora\.source_dirs"):
        resolve_source(str(allowed / "a"), [], from_config=False)


def test_a_hub_repository_may_come_only_from_the_config() -> None:
    assert resolve_source("org/adapter", [], from_config=True) == "org/adapter"
    with pytest.raises(AdapterError, match="local directory"):
        resolve_source("org/adapter", ["/tmp"], from_config=False)
    with pytest.raises(AdapterError, match="neither"):
        resolve_source("org/../../x", [], from_config=True)


def _write_adapter(path: Path, rank: int, shapes: dict[str, list[int]], base: str = V3) -> Path:
    path.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "base_model_name_or_path": base}
    (path / "adapter_config.json").write_text(json.dumps(config))
    header = json.dumps({k: {"dtype": "BF16", "shape": s, "data_offsets": [0, 0]} for k, s in shapes.items()})
    (path / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode())
    return path


SHAPES = model_shapes(str(ROOT / "models" / V3))
Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj"


def test_the_demo_models_shapes_are_read_from_params_json() -> None:
    assert ModelShapes(layers=2, hidden=128, q_out=128, kv_out=64, intermediate=256) == SHAPES


def test_the_demo_adapters_pass_every_check() -> None:
    facts = inspect_adapter(str(DEMO / f"{V3}-lora-0"), max_rank=8, shapes=SHAPES, base_names=(V3,))
    assert facts.rank == demo_adapters.RANK and facts.base == V3


@pytest.mark.parametrize(
    ("make", "status", "message"),
    [
        (lambda p: p / "missing", 404, "does not exist"),
        (lambda p: (p / "empty").mkdir() or p / "empty", 400, "no adapter_config.json"),
        (
            lambda p: (
                (p / "mistral").mkdir() or (p / "mistral" / "lora.safetensors").touch() or p / "mistral"
            ),
            400,
            "Mistral's own LoRA format",
        ),
        (
            lambda p: _write_adapter(p / "r", 16, {f"{Q_PROJ}.lora_A.weight": [16, 128]}),
            400,
            "rank 16 is larger",
        ),
        (
            lambda p: _write_adapter(p / "w", 8, {f"{Q_PROJ}.lora_A.weight": [8, 256]}),
            400,
            "wrong base model",
        ),
        (
            lambda p: _write_adapter(
                p / "l", 8, {"base_model.model.model.layers.9.mlp.up_proj.lora_B.weight": [256, 8]}
            ),
            400,
            "has layer 9",
        ),
        (
            lambda p: _write_adapter(p / "n", 8, {}, base="mistralai/Other-7B"),
            400,
            "trained on 'mistralai/Other-7B'",
        ),
    ],
)
def test_a_bad_adapter_gets_a_clear_4xx(tmp_path: Path, make: Any, status: int, message: str) -> None:
    with pytest.raises(AdapterError) as err:
        inspect_adapter(
            str(make(tmp_path)), max_rank=8, shapes=SHAPES, base_names=(V3, "./models/tiny-mistral-v3")
        )
    assert err.value.status == status and message in err.value.message


def test_the_base_name_is_compared_by_its_last_part(tmp_path: Path) -> None:
    path = _write_adapter(
        tmp_path / "a", 8, {f"{Q_PROJ}.lora_A.weight": [8, 128]}, base="/data/hub/tiny-mistral-v3/"
    )
    assert (
        inspect_adapter(str(path), max_rank=8, shapes=SHAPES, base_names=("mistralai/Tiny-Mistral-V3",)).rank
        == 8
    )


# --- the replica's cache --------------------------------------------------------------------


@dataclass
class Loads:
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    changes: list[list[str]] = field(default_factory=list)
    gate: asyncio.Event | None = None

    async def load(self, key: str) -> str:
        if self.gate is not None:
            await self.gate.wait()
        if key == "bad":
            raise AdapterError(400, "bad adapter")
        self.loaded.append(key)
        return key.upper()

    async def unload(self, key: str, value: str) -> None:
        assert value == key.upper()
        self.unloaded.append(key)

    def cache(self, capacity: int) -> AdapterCache[str]:
        return AdapterCache(capacity, self.load, self.unload, self.changes.append)


def test_the_cache_evicts_the_least_recently_used_past_its_capacity() -> None:
    async def go() -> None:
        loads = Loads()
        cache = loads.cache(2)
        for key in ("a", "b", "a", "c"):
            async with cache.hold(key):
                pass
            await cache.settled()
        assert loads.loaded == ["a", "b", "c"] and loads.unloaded == ["b"] and cache.keys() == ["a", "c"]
        assert loads.changes[-1] == ["a", "c"]

    asyncio.run(go())


def test_an_adapter_in_use_is_not_evicted_until_its_requests_end() -> None:
    async def go() -> None:
        loads = Loads()
        cache = loads.cache(1)
        async with cache.hold("a") as held_a:
            async with cache.hold("b") as held_b:
                assert (held_a, held_b) == (False, False)
                await cache.settled()
                assert cache.keys() == ["a", "b"] and loads.unloaded == []  # both in use: over capacity
            await cache.settled()
            assert loads.unloaded == ["b"]  # "a" is still in use: "b", done, is the one to go
        await cache.settled()
        assert cache.keys() == ["a"] and loads.unloaded == ["b"]


def test_a_caller_cancelled_after_its_request_does_not_cut_an_unload_short() -> None:
    async def go() -> None:
        loads = Loads()
        slow = asyncio.Event()

        async def unload(key: str, value: str) -> None:
            await slow.wait()
            loads.unloaded.append(key)

        cache: AdapterCache[str] = AdapterCache(1, loads.load, unload)
        async with cache.hold("a"):
            pass

        async def request() -> None:
            async with cache.hold("b"):
                pass
            await asyncio.Event().wait()  # the client's connection closes now: cancelled

        task = asyncio.ensure_future(request())
        await asyncio.sleep(0.01)
        task.cancel()
        slow.set()
        await cache.settled()
        assert loads.unloaded == ["a"] and cache.keys() == ["b"]

    asyncio.run(go())


def test_one_load_serves_every_request_waiting_for_it_and_survives_one_leaving() -> None:
    async def go() -> None:
        loads = Loads(gate=asyncio.Event())
        cache = loads.cache(2)

        async def use() -> bool:
            async with cache.hold("a") as held:
                return held

        first = asyncio.ensure_future(use())
        second = asyncio.ensure_future(use())
        await asyncio.sleep(0.01)
        first.cancel()  # its client left: the load goes on for the other
        loads.gate.set()
        assert await second is False and loads.loaded == ["a"]
        async with cache.hold("a") as held:
            assert held

    asyncio.run(go())


def test_a_failed_load_holds_nothing_and_is_tried_again() -> None:
    async def go() -> None:
        loads = Loads()
        cache = loads.cache(2)
        for _ in range(2):
            with pytest.raises(AdapterError):
                async with cache.hold("bad"):
                    pass
        assert cache.keys() == [] and loads.changes[-1] == []

    asyncio.run(go())


def _fake_lora_model() -> ModelConfig:
    return ModelConfig(
        id=V3,
        source=str(ROOT / "models" / V3),
        engine="fake",
        lora={"max_loras": 1, "max_lora_rank": 8, "source_dirs": [str(DEMO)]},
    )


def test_a_replica_loads_adapters_into_its_engine_and_counts_requests_by_outcome() -> None:
    async def go() -> None:
        config = _fake_lora_model()
        engine = FakeEngine(config)
        await engine.start()
        reported: list[list[str]] = []
        adapters = ReplicaAdapters(config, engine, report=lambda keys: reported.append(keys) or True)
        specs = [
            AdapterSpec(f"{V3}-lora-{i}", V3, str(DEMO / f"{V3}-lora-{i}"), revision=i + 1) for i in range(2)
        ]
        for spec in (specs[0], specs[0], specs[1]):
            async with adapters.use(spec):
                assert spec.name in engine.adapters
        await adapters.settled()
        assert list(engine.adapters) == [specs[1].name] and adapters.held() == [specs[1].key]
        assert adapters.counts == {"held": 1, "loaded": 2, "failed": 0}
        escape = AdapterSpec("x", V3, str(DEMO / ".." / V3), revision=9)
        with pytest.raises(AdapterError, match="outside"):
            async with adapters.use(escape):
                pass
        assert adapters.counts["failed"] == 1
        await asyncio.sleep(0.05)
        assert reported and reported[-1] == [specs[1].key]

    asyncio.run(go())


# --- routing to holders ---------------------------------------------------------------------


def test_an_adapters_requests_go_to_its_holders_then_to_the_emptiest_replica() -> None:
    ids = ["r0", "r1", "r2"]
    order = rank("a", ids)
    # Nobody holds it: the replica holding the fewest adapters first, the ranking among equals.
    assert adapter_order("a", ids, [set(), set(), set()]) == order
    assert adapter_order("a", ids, [{"x", "y"}, {"x"}, set()])[0] == 2
    # Holders first, in the ranking's order.
    held = [{"a", "x"}, set(), {"a"}]
    assert adapter_order("a", ids, held)[:2] == [i for i in order if "a" in held[i]]


def test_a_burst_of_new_adapters_spreads_before_the_replicas_report_them() -> None:
    async def go() -> None:
        deployment = DeploymentID(name="m", app_name="a")
        router = affinity_router(deployment)
        replicas = [
            HoldingReplica(ReplicaID(unique_id=u, deployment_id=deployment), set()) for u in ("p", "q")
        ]
        chosen = []
        for name in ("a", "b", "c", "d", "a", "c"):  # nothing reported held: all within one burst
            metadata = RequestMetadata(request_id="r", internal_request_id="i", multiplexed_model_id=name)
            pending = PendingRequest(args=[], kwargs={}, metadata=metadata, future=asyncio.Future())
            chosen.append((await router.choose_replicas(replicas, pending))[0][0].replica_id.unique_id)
        assert sorted(chosen[:4]) == ["p", "p", "q", "q"]  # two new adapters on each
        assert chosen[4] == chosen[0] and chosen[5] == chosen[2]  # and their next requests follow

    asyncio.run(go())


@dataclass
class HoldingReplica:
    replica_id: ReplicaID
    multiplexed_model_ids: set[str]
    max_ongoing_requests: int = 64


def test_the_router_sends_an_adapter_to_a_holder_unless_it_is_overloaded() -> None:
    async def go() -> None:
        deployment = DeploymentID(name="m", app_name="a")
        router = affinity_router(deployment)
        replicas = [
            HoldingReplica(ReplicaID(unique_id=u, deployment_id=deployment), set()) for u in ("p", "q")
        ]
        replicas[1].multiplexed_model_ids.add("lora-a")
        metadata = RequestMetadata(request_id="r", internal_request_id="i", multiplexed_model_id="lora-a")
        pending = PendingRequest(args=[], kwargs={}, metadata=metadata, future=asyncio.Future())
        assert await router.choose_replicas(replicas, pending) == [[replicas[1]], [replicas[0]]]
        # A holder keeps its adapter within a quarter of its capacity (64) over the least loaded.
        router.replica_queue_len_cache.update(replicas[1].replica_id, 15)
        router.replica_queue_len_cache.update(replicas[0].replica_id, 0)
        assert (await router.choose_replicas(replicas, pending))[0] == [replicas[1]]
        router.replica_queue_len_cache.update(replicas[1].replica_id, 16)
        router.replica_queue_len_cache.update(replicas[0].replica_id, 0)
        assert (await router.choose_replicas(replicas, pending))[0] == [replicas[0]]

    asyncio.run(go())


def test_a_model_with_adapters_gets_the_router_even_with_load_routing() -> None:
    assert router_config("load") is None and router_config("load", adapters=True) is not None


# --- the book of runtime adapters -----------------------------------------------------------


def test_the_registry_books_names_once_with_a_new_revision_each_time() -> None:
    async def go() -> None:
        book = AdapterRegistry(limit=2)
        first = await book.add("a", V3, "/x/a")
        assert isinstance(first, AdapterSpec) and first.key == "a@1"
        assert "already been loaded" in str(await book.add("a", V3, "/x/a"))
        assert await book.snapshot() == (1, [first])
        assert await book.snapshot(1) is None
        await book.add("b", V3, "/x/b")
        assert "unload one first" in str(await book.add("c", V3, "/x/c"))
        assert await book.remove("a") == first and await book.remove("a") is None
        again = await book.add("a", V3, "/x/a2")
        assert isinstance(again, AdapterSpec) and again.key == "a@3"  # another adapter: no replica holds it

    asyncio.run(go())


def test_the_engine_without_lora_refuses_adapters() -> None:
    engine = FakeEngine(ModelConfig(id="m", source="none", engine="fake"))
    with pytest.raises(AdapterError, match="serves no LoRA adapters"):
        asyncio.run(engine.add_adapter(AdapterRef("a", "/x", 1)))


def test_a_config_adapter_outside_the_source_dirs_fails_the_build(tmp_path: Path) -> None:
    from serve_app.config import ConfigError
    from serve_app.serving.builder import build_openai_app

    model = {
        "id": "m",
        "source": "none",
        "engine": "fake",
        "lora": {"source_dirs": [str(tmp_path / "allowed")]},
        "adapters": [{"name": "a", "source": str(tmp_path / "allowed" / ".." / "elsewhere")}],
    }
    with pytest.raises(ConfigError, match="adapter 'a': the adapter's directory is outside"):
        build_openai_app(AppConfig(models=[model]))
