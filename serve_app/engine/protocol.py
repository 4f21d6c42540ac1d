"""The contract between a model deployment and the engine it wraps.

`Engine.handle` is an async generator. Its first item is always a `Head`:
- `Head(status, body=...)`, `stream=False`: the whole response (JSON, or an OpenAI error
  body when `status` >= 400); nothing follows.
- `Head(200, stream=True)`: a stream follows, as `bytes` items, each holding one or more
  complete Server-Sent Events (`data: ...\\n\\n`), the last being `data: [DONE]\\n\\n`,
  and then, if the engine counted them, a `Usage` (for metrics; never sent to the client).

A whole response carries its `Usage` on the `Head`.

Only these small, serializable values cross a Ray Serve handle. Closing the generator
early (client gone) must abort the engine request.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serve_app.config import ModelConfig


class Route(str, enum.Enum):
    """The OpenAI endpoints a model deployment serves."""

    CHAT = "chat"
    COMPLETION = "completion"
    TOKENIZE = "tokenize"
    DETOKENIZE = "detokenize"


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one request used, for metrics and the access log."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Head:
    """Status of a response, and its whole body unless it streams."""

    status: int
    body: bytes = b""
    stream: bool = False
    usage: Usage | None = None  # of a whole response, when the engine knows it


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """One LoRA adapter as an engine loads it: its name (what requests send as `model`), where
    its files are (a checked local path, or a repository id from the config), and the id the
    replica gave this load of it (vLLM's lora_int_id: one per load, the same in every frontend
    of the replica's engine)."""

    name: str
    path: str
    lora_id: int
    aliases: tuple[str, ...] = ()  # other names requests may send for it

    @property
    def names(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What an engine knows about its model once started."""

    max_model_len: int


@dataclass(frozen=True, slots=True)
class EngineStats:
    """Live load of an engine."""

    in_flight: int  # requests the engine has accepted and not yet finished or aborted
    running: int = 0  # requests being generated
    waiting: int = 0  # requests queued inside the engine (no batch slot or KV cache yet)
    kv_cache_usage: float = 0.0  # share of the KV cache in use, 0..1
    # Prompt tokens the engine looked up in its prefix cache since it started, and found there.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0


class Engine(ABC):
    """One inference engine serving one model inside one replica."""

    def __init__(self, config: ModelConfig) -> None:
        from serve_app.config import RequestLimits

        self.config = config
        # Bounds a request must keep to (serve_app.guards.limits), checked before any engine work.
        self.limits = RequestLimits()

    @classmethod
    @abstractmethod
    def validate(cls, config: ModelConfig) -> None:
        """Raise ConfigError if `config` cannot run on this engine (checked when the app is built)."""

    @abstractmethod
    async def start(self) -> None:
        """Load the model; `handle` may be called only after this returns."""

    @abstractmethod
    def handle(self, route: Route, body: bytes, request_id: str) -> AsyncIterator[Head | bytes | Usage]:
        """Serve one OpenAI request whose JSON body is `body` (see the module docstring)."""

    @abstractmethod
    async def check_health(self) -> None:
        """Raise if the engine cannot serve."""

    def dead(self) -> bool:
        """Whether the engine has died for good (the replica should then be replaced)."""
        return False

    @property
    def core_pids(self) -> list[int]:
        """The processes, other than the replica's own, that run the engine's compute (empty
        where it runs in the replica's process)."""
        return []

    @abstractmethod
    def info(self) -> ModelInfo:
        """Facts about the loaded model."""

    @abstractmethod
    def stats(self) -> EngineStats:
        """The engine's current load, at once (the replica reports it to autoscaling)."""

    async def current_stats(self) -> EngineStats:
        """The engine's load as the engine itself holds it now, where `stats()` is a view
        (e.g. over frontend processes); for diagnostics and tests."""
        return self.stats()

    @classmethod
    def sleep_unsupported(cls, config: ModelConfig) -> str | None:
        """Why `config` cannot sleep on this engine, or None if it can (see `sleep`)."""
        return f"the {config.engine} engine has no sleep mode"

    async def sleep(self) -> None:
        """Park the engine: free its accelerator memory, keeping what waking needs (vLLM's sleep
        level 1: weights to host memory, KV cache dropped). Call only with no request in flight;
        `handle` may not be called again before `wake_up`."""
        raise NotImplementedError(self.sleep_unsupported(self.config))

    async def wake_up(self) -> None:
        """Bring a sleeping engine back; `handle` may be called once this returns."""
        raise NotImplementedError(self.sleep_unsupported(self.config))

    async def add_adapter(self, adapter: AdapterRef) -> None:
        """Load a LoRA adapter: requests that name it are then served with it, until
        `remove_adapter`. Raises serve_app.guards.adapters.AdapterError if it cannot load."""
        from serve_app.guards.adapters import AdapterError

        raise AdapterError(400, f"the {self.config.engine} engine serves no LoRA adapters")

    async def remove_adapter(self, adapter: AdapterRef) -> None:
        """Unload an adapter `add_adapter` loaded; requests in flight with it finish with it."""
        await self.add_adapter(adapter)  # raises: this engine loads no adapter to remove

    @abstractmethod
    async def shutdown(self) -> None:
        """Stop the engine and every process it started."""
