"""What the ingress knows of the models it routes to: one record per served model, found by
any of its names (id or alias)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ray.serve.handle import DeploymentHandle

from serve_app.errors import ApiError
from serve_app.serving.adapters import AdapterSpec

# How long /v1/models waits for a replica to tell a model's context length that the config
# does not give; a model at zero replicas would be woken by the question, so it gives up.
MODEL_INFO_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class ModelCard:
    """What the builder tells the ingress about one model (it crosses to the ingress replicas)."""

    id: str
    aliases: tuple[str, ...]
    deployment: str
    owned_by: str
    max_model_len: int | None = None
    wait_timeout_s: float = 300.0  # how long a request may wait for a replica to take it
    priority_scheduling: bool = False  # the engine schedules by request priority
    routing: str = "load"  # which replica takes a request (serve_app.serving.routing)
    lora: bool = False  # the model serves LoRA adapters
    adapters: tuple[AdapterSpec, ...] = ()  # those of its config

    @property
    def names(self) -> tuple[str, ...]:
        return (self.id, *self.aliases)


@dataclass
class ServedModel:
    """One model as the ingress routes to it: its card and the handles of its deployment."""

    card: ModelCard
    handle: DeploymentHandle
    stream: DeploymentHandle  # `generate`, streamed
    max_model_len: int | None  # from the config, else asked from a replica once
    adapter_streams: dict[str, DeploymentHandle] = field(default_factory=dict)  # by AdapterSpec.key

    def stream_for(self, adapter: AdapterSpec | None) -> DeploymentHandle:
        """The streaming handle of a request for `adapter` (Serve's multiplexed model id set,
        which the model's router routes by), or of a base-model request."""
        if adapter is None:
            return self.stream
        handle = self.adapter_streams.get(adapter.key)
        if handle is None:
            handle = self.adapter_streams[adapter.key] = self.stream.options(multiplexed_model_id=adapter.key)
        return handle

    def to_openai(self, name: str, created: int, adapter: AdapterSpec | None = None) -> dict[str, Any]:
        """The `/v1/models` entry of this model under `name` (its id or an alias), or of one of
        its adapters (its name or an alias): an adapter's `parent` names this model, as vLLM's
        does, and so does its `root` (vLLM's is the adapter's path: not shown here)."""
        names = self.card.names if adapter is None else (adapter.name, *adapter.aliases)
        card: dict[str, Any] = {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": self.card.owned_by,
            "root": self.card.id,
            "aliases": [n for n in names if n != name],
        }
        if adapter is not None:
            card["parent"] = self.card.id
        if self.max_model_len is not None:
            card["max_model_len"] = self.max_model_len
        return card

    async def learn_max_model_len(self) -> None:
        """Ask a replica for the context length the config does not give (the answer never
        changes); without an answer within MODEL_INFO_TIMEOUT_S, leave it unknown."""
        if self.max_model_len is not None:
            return
        response = self.handle.model_info.remote()
        try:
            info = await asyncio.wait_for(response, timeout=MODEL_INFO_TIMEOUT_S)
            self.max_model_len = info.max_model_len
        except Exception:  # no replica ready yet: list the model without it
            response.cancel()


def shown(name: str, limit: int = 100) -> str:
    """A client's name for a model as an error repeats it: cut short past `limit` characters."""
    return name if len(name) <= limit else name[:limit] + "..."


def stream_handle(handle: DeploymentHandle) -> DeploymentHandle:
    """The handle that streams `generate` from a model deployment.

    Chunks travel over Serve's direct gRPC transport between replicas rather than as Ray
    objects (`_by_reference=False`): measured on 2 CPU cores with the demo model, 516
    against 469 output tokens/s at 64 streams. They are pickled, not cloudpickled: every
    item is bytes or one of our small dataclasses. Ray releases without the option stream by
    reference.
    """
    try:
        return handle.options(
            method_name="generate",
            stream=True,
            _by_reference=False,
            request_serialization="pickle",
            response_serialization="pickle",
        )
    except TypeError:
        return handle.options(method_name="generate", stream=True)


class Catalog:
    """Every served model, by each of its names, and every LoRA adapter, by its name."""

    def __init__(self, cards: Sequence[ModelCard], handles: Mapping[str, DeploymentHandle]) -> None:
        self._by_name: dict[str, ServedModel] = {}
        self._by_id: dict[str, ServedModel] = {}
        for card in cards:
            handle = handles[card.deployment]
            # `.options()` builds a new handle: do it once here, not per request.
            model = ServedModel(card, handle, stream_handle(handle), card.max_model_len)
            self._by_name.update(dict.fromkeys(card.names, model))
            self._by_id[card.id] = model
        self._configured = {n: a for card in cards for a in card.adapters for n in (a.name, *a.aliases)}
        self._adapters: dict[str, AdapterSpec] = dict(self._configured)
        # Like `vllm serve`, a server of one model lets requests leave `model` out.
        self.only_model = cards[0].id if len(cards) == 1 else None

    def names(self) -> Iterator[str]:
        """Every served name, ids and aliases, in config order, then the adapters'."""
        yield from self._by_name
        yield from self._adapters

    def get(self, name: str) -> ServedModel:
        """The model served under `name` (an adapter's base for an adapter); ApiError 404 if none."""
        return self.resolve(name)[0]

    def models(self) -> list[ServedModel]:
        """Every model, once each, in config order."""
        return list(self._by_id.values())

    def model(self, model_id: str) -> ServedModel | None:
        """The model of this id (not an alias), None if there is none."""
        return self._by_id.get(model_id)

    def resolve(self, name: str) -> tuple[ServedModel, AdapterSpec | None]:
        """The model served under `name`, and the adapter if `name` is one; ApiError 404 if none."""
        model = self._by_name.get(name)
        if model is not None:
            return model, None
        adapter = self._adapters.get(name)
        if adapter is None:
            raise ApiError(404, f"The model `{shown(name)}` does not exist.", param="model")
        return self._by_id[adapter.base], adapter

    def of_payload(self, payload: Mapping[str, Any]) -> tuple[str, ServedModel, AdapterSpec | None]:
        """The name a request body asks for (`model`), its model and adapter; ApiError 400/404."""
        name = payload.get("model", self.only_model)
        if not isinstance(name, str) or not name:
            raise ApiError(400, "`model` is required and must be a string.", param="model")
        return name, *self.resolve(name)

    def card(self, name: str, created: int) -> dict[str, Any]:
        """The `/v1/models` entry of `name`; ApiError 404 if it names nothing served."""
        model, adapter = self.resolve(name)
        return model.to_openai(name, created, adapter)

    # --- adapters added at run time (serve_app.serving.adapter_registry) ---------------------

    def adapter(self, name: str) -> AdapterSpec | None:
        return self._adapters.get(name)

    def is_configured_adapter(self, name: str) -> bool:
        return name in self._configured

    def taken(self, name: str) -> bool:
        """Whether `name` already names a model, an alias or an adapter."""
        return name in self._by_name or name in self._adapters

    def set_runtime_adapters(self, specs: Sequence[AdapterSpec]) -> None:
        """The adapters added at run time are now `specs` (those of the config stay)."""
        runtime = {s.name: s for s in specs if s.base in self._by_id and s.name not in self._configured}
        self._adapters = {**self._configured, **runtime}
        live = {s.key for s in self._adapters.values()}
        for model in self._by_id.values():  # handles of adapters no longer served
            for key in [k for k in model.adapter_streams if k not in live]:
                del model.adapter_streams[key]
