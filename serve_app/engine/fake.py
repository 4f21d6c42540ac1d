"""A fake engine for load and scaling tests: OpenAI-shaped answers at a set speed, no model.

It honours the same contract as the vLLM engine (tests/contract runs both through the same
tests): a `Head` first, OpenAI chat/completion bodies and SSE chunks, 400s in OpenAI's
shape for bad bodies, usage counts, and cancellation that frees the request at once. Its
time to first token and token rate are knobs, and at most `max_num_seqs` requests run at
once (the rest wait, as in an engine's scheduler), so autoscaling can be tested with many
replicas on a small machine. It serves LoRA adapters as the vLLM engine does (a PEFT directory,
checked, named by the requests that use it; each adapter's answers are its own: "NAME-tok0 ...").
It keeps a prefix cache as vLLM does (blocks of prompt words,
least recently used out first): its hits shorten the time to first token by what their
prefill would take, and show in its stats and, as vLLM's, in `prompt_tokens_details`.

Use it with `engine: fake` in a model config; `engine_args` then takes FakeEngineArgs.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from serve_app.config import ConfigError, ModelConfig
from serve_app.engine.protocol import AdapterRef, Engine, EngineStats, Head, ModelInfo, Route, Usage
from serve_app.errors import error_body
from serve_app.guards.adapters import AdapterError, inspect_adapter, is_local
from serve_app.guards.limits import InputError, check_request


class FakeEngineArgs(BaseModel):
    """Knobs of the fake engine (its `engine_args`)."""

    model_config = ConfigDict(extra="forbid")

    ttft_s: float = Field(0.05, ge=0, description="Seconds from request to first token.")
    tokens_per_s: float = Field(50.0, gt=0, description="Tokens per second per request after the first.")
    max_num_seqs: int = Field(8, ge=1, description="Requests generated at once; more wait.")
    max_model_len: int = Field(4096, ge=16, description="Context length: prompt + max_tokens.")
    startup_s: float = Field(0.0, ge=0, description="Seconds start() takes (a model load).")
    sleep_s: float = Field(0.0, ge=0, description="Seconds sleep() takes (weights to host memory).")
    wake_s: float = Field(0.0, ge=0, description="Seconds wake_up() takes (weights back).")
    prefix_block_words: int = Field(16, ge=1, description="Words (tokens) per prefix-cache block.")
    prefix_cache_blocks: int = Field(4096, ge=0, description="Blocks the prefix cache holds; 0: none.")
    prefill_s_per_token: float = Field(
        0.0, ge=0, description="Seconds of time to first token per prompt word not in the prefix cache."
    )
    enable_prompt_tokens_details: bool = Field(
        False, description="Give `usage.prompt_tokens_details.cached_tokens`, as vLLM's server option."
    )
    adapter_load_s: float = Field(0.0, ge=0, description="Seconds add_adapter() takes (a LoRA load).")
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "fcfs",
        description="Which waiting request gets a free slot: the oldest (fcfs), or the one with the "
        "lowest `priority`, then the oldest (priority), as vLLM's scheduling_policy.",
    )


class PrefixCache:
    """Which prompt blocks an engine holds: each block is known by the hash of the prompt up to
    its end (as vLLM's), so a lookup matches only a common beginning."""

    def __init__(self, block_words: int, blocks: int) -> None:
        self._block = block_words
        self._capacity = blocks
        self._held: OrderedDict[int, None] = OrderedDict()
        self.queries = 0
        self.hits = 0

    def lookup(self, words: list[str]) -> int:
        """The words of `words`' beginning found in the cache; the prompt's blocks are held after."""
        chain: list[int] = []
        parent = 0
        for end in range(self._block, len(words) + 1, self._block):
            parent = hash((parent, *words[end - self._block : end]))
            chain.append(parent)
        found = 0
        while found < len(chain) and chain[found] in self._held:
            found += 1
        for block in chain:
            self._held[block] = None
            self._held.move_to_end(block)
        while len(self._held) > self._capacity:
            self._held.popitem(last=False)
        hit = found * self._block
        self.queries += len(words)
        self.hits += hit
        return hit


class Slots:
    """`max_num_seqs` generation slots; waiting requests get them in the scheduling policy's order."""

    def __init__(self, slots: int, by_priority: bool) -> None:
        self._free = slots
        self._by_priority = by_priority
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []  # a heap
        self._arrivals = itertools.count()

    async def acquire(self, priority: int) -> None:
        if self._free > 0 and not self._waiting:
            self._free -= 1
            return
        granted = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority if self._by_priority else 0, next(self._arrivals), granted))
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release()  # given a slot just as it was cancelled: pass it on
            raise

    def release(self) -> None:
        while self._waiting:
            *_, granted = heapq.heappop(self._waiting)
            if not granted.done():  # skip those cancelled while waiting
                granted.set_result(None)
                return
        self._free += 1


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


def _int_field(body: dict[str, Any], name: str, default: int | None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _BadRequest(f"{name} must be an integer", name)
    return value


class FakeEngine(Engine):
    """Deterministic OpenAI answers ("tok0 tok1 ...") at `tokens_per_s` after `ttft_s`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        self.args = FakeEngineArgs.model_validate(config.engine_args)
        self._slots = Slots(self.args.max_num_seqs, self.args.scheduling_policy == "priority")
        self._in_flight = 0
        self._running = 0
        self._started = False
        self.asleep = False
        self._cache = PrefixCache(self.args.prefix_block_words, self.args.prefix_cache_blocks)
        self.adapters: dict[str, AdapterRef] = {}  # loaded, by each of their names

    @classmethod
    def validate(cls, config: ModelConfig) -> None:
        try:
            FakeEngineArgs.model_validate(config.engine_args)
        except ValidationError as exc:
            raise ConfigError(f"model '{config.id}': engine_args: {exc}") from None

    async def start(self) -> None:
        await asyncio.sleep(self.args.startup_s)
        self._started = True

    def info(self) -> ModelInfo:
        return ModelInfo(max_model_len=self.args.max_model_len)

    def stats(self) -> EngineStats:
        return EngineStats(
            in_flight=self._in_flight,
            running=self._running,
            waiting=self._in_flight - self._running,
            kv_cache_usage=self._running / self.args.max_num_seqs,
            prefix_cache_queries=self._cache.queries,
            prefix_cache_hits=self._cache.hits,
        )

    async def check_health(self) -> None:
        if not self._started:
            raise RuntimeError("the fake engine has not been started")

    @classmethod
    def sleep_unsupported(cls, config: ModelConfig) -> str | None:
        return None

    async def sleep(self) -> None:
        if self._in_flight:
            raise RuntimeError(f"the engine cannot sleep with {self._in_flight} requests in flight")
        await asyncio.sleep(self.args.sleep_s)
        self.asleep = True

    async def wake_up(self) -> None:
        await asyncio.sleep(self.args.wake_s)
        self.asleep = False

    async def shutdown(self) -> None:
        self._started = False

    async def add_adapter(self, adapter: AdapterRef) -> None:
        lora = self.config.lora_options
        if lora is None:
            raise AdapterError(
                400, f"model '{self.config.id}' serves no LoRA adapters (no `lora` in its config)"
            )
        if is_local(adapter.path):
            inspect_adapter(adapter.path, max_rank=lora.max_lora_rank, shapes=None)
        await asyncio.sleep(self.args.adapter_load_s)
        self.adapters.update(dict.fromkeys(adapter.names, adapter))

    async def remove_adapter(self, adapter: AdapterRef) -> None:
        for name in adapter.names:
            current = self.adapters.get(name)
            if current is not None and current.lora_id == adapter.lora_id:
                del self.adapters[name]

    def _parse(self, route: Route, body: bytes) -> tuple[dict[str, Any], list[str], int]:
        try:
            req = json.loads(body)
        except ValueError as exc:
            raise _BadRequest(f"invalid JSON: {exc}") from None
        if not isinstance(req, dict):
            raise _BadRequest("the body must be a JSON object")
        if route is Route.CHAT:
            messages = req.get("messages")
            if not isinstance(messages, list) or not messages:
                raise _BadRequest("messages must be a non-empty array", "messages")
            if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
                raise _BadRequest("each message needs a role", "messages")
            text = " ".join(str(m.get("content", "")) for m in messages)
        else:
            prompt = req.get("prompt")
            if not isinstance(prompt, str | list) or not prompt:
                raise _BadRequest("prompt must be a string or an array", "prompt")
            text = prompt if isinstance(prompt, str) else " ".join(map(str, prompt))
        # The prompt's tokens: a word each, and four of the chat template around them.
        words = ["<s>", *text.split(), "[/INST]", "<t>", "<t>"]
        prompt_tokens = len(words)
        max_tokens = _int_field(req, "max_completion_tokens", None) or _int_field(req, "max_tokens", 16)
        assert max_tokens is not None
        if max_tokens < 1:
            raise _BadRequest("max_tokens must be at least 1", "max_tokens")
        if prompt_tokens + max_tokens > self.args.max_model_len:
            raise _BadRequest(
                f"max_tokens={max_tokens} cannot be greater than max_model_len={self.args.max_model_len}",
                "max_tokens",
            )
        return req, words, max_tokens

    async def handle(self, route: Route, body: bytes, request_id: str) -> AsyncIterator[Head | bytes | Usage]:
        if not self._started or self.asleep:
            raise RuntimeError(f"the fake engine is {'asleep' if self._started else 'not started'}")
        if route not in (Route.CHAT, Route.COMPLETION):
            yield Head(404, error_body(404, f"the fake engine does not serve the {route.value} API"))
            return
        try:
            req, words, max_tokens = self._parse(route, body)
            self._check_model(req)
            priority = _int_field(req, "priority", 0) or 0
            check_request(route.value, req, self.limits, self.args.max_model_len)
        except _BadRequest as exc:
            yield Head(exc.status, error_body(exc.status, str(exc), param=exc.param))
            return
        except InputError as exc:
            yield Head(exc.status, exc.body())
            return
        self._in_flight += 1
        try:
            await self._slots.acquire(priority)
            self._running += 1
            try:
                cached = self._cache.lookup(words)
                async for item in self._generate(route, req, request_id, len(words), cached, max_tokens):
                    yield item
            finally:
                self._running -= 1
                self._slots.release()
        finally:
            self._in_flight -= 1

    def _check_model(self, req: dict[str, Any]) -> None:
        """On a model serving adapters, a name the engine does not serve (an adapter it has not
        loaded) is a 404, as vLLM's."""
        model = req.get("model")
        if (
            self.config.lora_options is None
            or model is None
            or model in self.config.names
            or model in self.adapters
        ):
            return
        raise _BadRequest(f"The model `{model}` does not exist.", "model", status=404)

    async def _generate(
        self, route: Route, req: dict[str, Any], request_id: str, prompt_tokens: int, cached: int, n: int
    ) -> AsyncIterator[Head | bytes | Usage]:
        chat = route is Route.CHAT
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        created = int(time.time())
        model = str(req.get("model", self.config.id))
        adapter = self.adapters.get(model)
        if adapter is not None:
            model = adapter.name  # as vLLM: an alias's answers say the adapter's name
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n,
            "total_tokens": prompt_tokens + n,
        }
        if self.args.enable_prompt_tokens_details:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        base = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
        }
        await asyncio.sleep(self.args.ttft_s + self.args.prefill_s_per_token * (prompt_tokens - cached))
        gap = 1.0 / self.args.tokens_per_s
        word = f"{model}-tok" if adapter is not None else "tok"
        if not req.get("stream"):
            await asyncio.sleep(gap * (n - 1))
            text = " ".join(f"{word}{i}" for i in range(n))
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            obj = "chat.completion" if chat else "text_completion"
            full = {**base, "object": obj, "choices": [choice], "usage": usage}
            yield Head(200, json.dumps(full).encode(), usage=Usage(prompt_tokens, n))
            return
        yield Head(200, stream=True)
        if chat:
            role = {"role": "assistant", "content": ""}
            first = {"index": 0, "delta": role, "logprobs": None, "finish_reason": None}
            yield _sse({**base, "choices": [first]})
        for i in range(n):
            if i:
                await asyncio.sleep(gap)
            piece = f"{word}{i}" if i == 0 else f" {word}{i}"
            finish = "length" if i == n - 1 else None
            part = {"content": piece} if chat else None
            choice = {"index": 0, "finish_reason": finish, "logprobs": None}
            choice.update({"delta": part} if chat else {"text": piece})
            yield _sse({**base, "choices": [choice]})
        options = req.get("stream_options") or {}
        if isinstance(options, dict) and options.get("include_usage"):
            yield _sse({**base, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"
        yield Usage(prompt_tokens, n)
