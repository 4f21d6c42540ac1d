"""The LoRA adapters added at run time (the admin routes), one book for every ingress replica.

It runs as one small deployment of the application, only where the config enables the admin
routes and some model serves adapters. An ingress replica that takes an admin call writes here;
every ingress replica reads the book when it is a second old, and at once when a request names
a model it does not know, so an added adapter is served through all of them within about a
second. Replicas of the models need none of it: each request carries its adapter's spec.

The book lives as long as the application: adapters that must outlive a redeploy belong in the
config.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from serve_app.serving.adapters import AdapterSpec

logger = logging.getLogger("ray.serve")

REGISTRY_NAME = "AdapterRegistry"
MAX_RUNTIME_ADAPTERS = 1024
REFRESH_S = 1.0  # an ingress replica reads the book when its copy is this old
MISS_REFRESH_S = 0.25  # and at most this often for names it does not know


class AdapterRegistry:
    """The adapters added at run time, by name, and a version that changes with each change."""

    def __init__(self, limit: int = MAX_RUNTIME_ADAPTERS) -> None:
        self._limit = limit
        self._specs: dict[str, AdapterSpec] = {}
        self._revision = 0  # of the last adapter added: each addition gets the next
        self.version = 0

    async def add(self, name: str, base: str, source: str) -> AdapterSpec | str:
        """Add an adapter; the spec, or why not (its name is taken, the book is full)."""
        if name in self._specs:
            return f"The lora adapter '{name}' has already been loaded."
        if len(self._specs) >= self._limit:
            return f"{self._limit} adapters are loaded at run time already; unload one first."
        self._revision += 1
        spec = self._specs[name] = AdapterSpec(name, base, source, self._revision)
        self.version += 1
        logger.info("adapter %s of %s added at run time", name, base)
        return spec

    async def remove(self, name: str) -> AdapterSpec | None:
        spec = self._specs.pop(name, None)
        if spec is not None:
            self.version += 1
            logger.info("adapter %s of %s removed at run time", name, spec.base)
        return spec

    async def snapshot(self, known: int = -1) -> tuple[int, list[AdapterSpec]] | None:
        """The version and every adapter, or None if the caller's `known` version is current."""
        if known == self.version:
            return None
        return self.version, list(self._specs.values())


class RegistryView:
    """An ingress replica's copy of the book: refreshed in the background when a second old,
    and on demand (rate-limited) for a name it does not know."""

    def __init__(
        self,
        fetch: Callable[[int], Awaitable[tuple[int, list[AdapterSpec]] | None]],
        apply: Callable[[Sequence[AdapterSpec]], None],
    ) -> None:
        self._fetch = fetch
        self._apply = apply
        self._version = -1
        self._fetched_at = -1e9
        self._task: asyncio.Task[None] | None = None

    def touch(self) -> None:
        """Refresh in the background if the copy is older than REFRESH_S."""
        if time.monotonic() - self._fetched_at >= REFRESH_S and (self._task is None or self._task.done()):
            self._task = asyncio.ensure_future(self._refresh_quietly())

    async def refresh_for_miss(self) -> None:
        """Refresh now, unless the copy is younger than MISS_REFRESH_S."""
        if time.monotonic() - self._fetched_at >= MISS_REFRESH_S:
            await self._refresh_quietly()

    async def refresh(self) -> None:
        self._fetched_at = time.monotonic()
        answer = await self._fetch(self._version)
        if answer is not None:
            self._version, specs = answer
            self._apply(specs)

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception as exc:  # the registry restarts: keep the copy meanwhile
            logger.warning("cannot read the adapter registry: %r", exc)
