"""The admin routes: LoRA adapters added and removed at run time, as vLLM's
`/v1/load_lora_adapter` and `/v1/unload_lora_adapter` take them.

They exist only where the config sets `auth.admin` (else 404, as any unknown path), and always
ask for one of its keys, never an API key. A load names the adapter (`lora_name`), its local
directory (`lora_path`, inside the base model's `lora.source_dirs`), and the base model
(`model`: needed when several models serve adapters). A replica of the base model checks the
directory (serve_app.guards.adapters) before the adapter is booked; a bad one is a 4xx and
changes nothing. The book (serve_app.serving.adapter_registry) is shared by every ingress
replica; replicas of the model load the adapter on its first request.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from typing import Any

from ray.serve.handle import DeploymentHandle

from serve_app.config import KeySources
from serve_app.config.model import ADAPTER_NAME_PATTERN
from serve_app.errors import ApiError
from serve_app.guards.auth import KeyChecker
from serve_app.serving.adapter_registry import RegistryView
from serve_app.serving.adapters import AdapterSpec
from serve_app.serving.catalog import Catalog, ServedModel, shown

MAX_PATH_CHARS = 4096
CHECK_TIMEOUT_S = 60.0  # a replica checks an adapter's files within this (it may be starting)
_NAME = re.compile(ADAPTER_NAME_PATTERN)


class AdapterAdmin:
    """Adds and removes the adapters of the catalog's models at run time."""

    def __init__(self, keys: KeySources | None, registry: DeploymentHandle | None, catalog: Catalog) -> None:
        self._keys = KeyChecker.from_options(keys, "auth.admin") if keys is not None else None
        self._registry = registry
        self._catalog = catalog
        self.view = (
            RegistryView(lambda known: registry.snapshot.remote(known), catalog.set_runtime_adapters)
            if registry is not None
            else None
        )

    @property
    def enabled(self) -> bool:
        return self._keys is not None and self._registry is not None

    def authorize(self, authorization: str | None) -> None:
        """ApiError 404 where the routes are off, 401 without an admin key."""
        if not self.enabled or self._keys is None:
            raise ApiError(404, "Not Found")
        if self._keys.identify(authorization) is None:
            raise ApiError(401, "An admin key is required: Authorization: Bearer <admin key>.")

    async def load(self, payload: Mapping[str, Any]) -> str:
        """Book an adapter after a replica of its base has checked it; the success message."""
        name = _field(payload, "lora_name")
        path = _field(payload, "lora_path", MAX_PATH_CHARS)
        if not _NAME.fullmatch(name):
            raise ApiError(
                400,
                "lora_name must be 1 to 128 letters, digits or '._:/-', starting with a letter or digit.",
                param="lora_name",
            )
        if payload.get("load_inplace"):
            raise ApiError(400, "load_inplace is not supported: unload the adapter, then load it again.")
        model = self._base(payload.get("model"))
        if self._catalog.taken(name):
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
        spec = AdapterSpec(name, model.card.id, path, revision=1)  # the registry gives the real one
        await self._check(model, spec)
        assert self._registry is not None
        booked = await self._registry.add.remote(name, model.card.id, path)
        if isinstance(booked, str):
            raise ApiError(400, booked, param="lora_name")
        assert self.view is not None
        await self.view.refresh()
        return f"Success: LoRA adapter '{name}' added successfully."

    async def unload(self, payload: Mapping[str, Any]) -> str:
        name = _field(payload, "lora_name")
        if self._catalog.is_configured_adapter(name):
            raise ApiError(
                400,
                f"The lora adapter '{shown(name)}' comes from the config: remove it there.",
                param="lora_name",
            )
        assert self._registry is not None and self.view is not None
        removed = await self._registry.remove.remote(name)
        if removed is None:
            raise ApiError(404, f"The lora adapter '{shown(name)}' cannot be found.", param="lora_name")
        await self.view.refresh()
        return f"Success: LoRA adapter '{name}' removed successfully."

    def _base(self, requested: Any) -> ServedModel:
        """The base model a load names, or the only one serving adapters."""
        if requested is None:
            with_lora = [m for m in self._catalog.models() if m.card.lora]
            if len(with_lora) != 1:
                raise ApiError(
                    400, "Name the base model in `model`: several models serve adapters.", param="model"
                )
            return with_lora[0]
        if not isinstance(requested, str):
            raise ApiError(400, "`model` must be a string.", param="model")
        model, adapter = self._catalog.resolve(requested)
        if adapter is not None or not model.card.lora:
            raise ApiError(
                400,
                f"The model `{shown(requested)}` serves no LoRA adapters (no `lora` in its config).",
                param="model",
            )
        return model

    async def _check(self, model: ServedModel, spec: AdapterSpec) -> None:
        response = model.handle.check_adapter.remote(spec)
        try:
            problem = await asyncio.wait_for(response, timeout=CHECK_TIMEOUT_S)
        except TimeoutError:
            response.cancel()
            raise ApiError(
                503,
                f"No replica of `{model.card.id}` checked the adapter in time; retry later.",
                headers={"Retry-After": "10"},
            ) from None
        if problem is not None:
            status, message = problem
            raise ApiError(
                status, f"The lora adapter '{spec.name}' cannot be loaded: {message}", param="lora_path"
            )


def _field(payload: Mapping[str, Any], name: str, limit: int = 128) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"'{name}' must be provided, as a string.", param=name)
    if len(value) > limit:
        raise ApiError(400, f"'{name}' is longer than {limit} characters.", param=name)
    return value
