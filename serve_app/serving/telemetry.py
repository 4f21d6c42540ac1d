"""What operators see of each request: Ray metrics per model, and one JSON access-log line.

Metrics go through Ray's metrics system (`ray.util.metrics`), so they reach each node's
Prometheus endpoint and the Ray dashboard's Grafana. Ray prefixes their names with `ray_`
and gives counters a `_total` suffix: `mistral_serve_requests` is scraped as
`ray_mistral_serve_requests_total`. Labels hold only values from the config (model ids,
routes, status codes) or from an operator (the names of LoRA adapters, in an `adapter` label
beside their base model's id), never anything a client sent, so their number stays bounded.

The gateway (ingress) measures what a client sees; each model replica reports its
engine's scheduler (see `EngineGauges`). vLLM's own engine-side metrics are exported
beside them by the vLLM engine (`ray_vllm_*`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections import Counter as Tally
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from serve_app.engine.protocol import EngineStats, Usage

UNKNOWN_MODEL = "_unknown"  # the model label of requests that name no served model
CLIENT_CLOSED = 499  # the status recorded for a request whose client went away (nginx's code)

# LLM latencies: tens of milliseconds (a token) to minutes (a long generation).
TTFT_BUCKETS = [
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1,
    1.5,
    2,
    3,
    5,
    7.5,
    10,
    20,
    30,
    60,
]
TPOT_BUCKETS = [
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    1,
]
DURATION_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 600]
QUEUE_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300]

ACCESS_LOGGER = "mistral_serve.access"


@dataclass
class RequestRecord:
    """One request as the gateway saw it (times from `time.perf_counter`)."""

    request_id: str
    route: str
    model: str = UNKNOWN_MODEL
    adapter: str = ""  # the LoRA adapter the request named (its model is the adapter's base)
    identity: str = ""  # who sent it (an API key's hash, or anonymous); never logged
    admission: Any = None  # its quota admission, released when it ends
    stream: bool = False
    status: int = 0
    start: float = field(default_factory=time.perf_counter)
    accepted: float | None = None  # a model replica took the request
    first_chunk: float | None = None  # the first streamed bytes (the first token)
    last_chunk: float | None = None
    usage: Usage | None = None
    cancelled: bool = False
    done: bool = False  # the response was sent whole (a stream to its end)
    in_flight: bool = False  # counted in the in-flight gauge of `model`
    error: str | None = None
    request_text: str | None = None  # only with log_request_text
    response_text: list[bytes] | None = None  # only with log_request_text
    body_bytes: int = 0  # the size of the request body
    events: int = 0  # SSE events relayed to the client
    hold: Any = None  # an interactive request's place in its lane (lanes.Hold), released at its end
    release_hold_at_first_chunk: bool = True  # or at its first token

    def chunk(self, data: bytes) -> None:
        now = time.perf_counter()
        if self.first_chunk is None:
            self.first_chunk = now
            if self.hold is not None and self.release_hold_at_first_chunk:
                self.hold.release()
        self.last_chunk = now
        self.events += data.count(b"data: ")
        if self.response_text is not None:
            self.response_text.append(data)

    @property
    def tokens_used(self) -> int:
        """Prompt and completion tokens, as the engine counted them; for a request that ended
        without the count (a stream cut short), an estimate: a token per 4 bytes of body, and one
        per event it received."""
        if self.usage is not None:
            return self.usage.prompt_tokens + self.usage.completion_tokens
        return self.body_bytes // 4 + self.events

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_chunk is None else self.first_chunk - self.start

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first, of a stream."""
        if self.first_chunk is None or self.last_chunk is None or self.usage is None:
            return None
        if self.usage.completion_tokens < 2:
            return None
        return (self.last_chunk - self.first_chunk) / (self.usage.completion_tokens - 1)


class _GatewayMetrics:
    def __init__(self) -> None:
        from ray.util import metrics

        by_model = ("model",)
        by_route = ("model", "route")
        by_adapter = ("model", "adapter")  # adapter: a LoRA adapter's name, "" for the base model
        self.requests = metrics.Counter(
            "mistral_serve_requests",
            description="Requests answered by the gateway, by model, LoRA adapter, route and HTTP "
            "status (499: the client went away first).",
            tag_keys=("model", "adapter", "route", "status"),
        )
        self.duration = metrics.Histogram(
            "mistral_serve_request_duration_seconds",
            description="End-to-end time of a request at the gateway.",
            boundaries=DURATION_BUCKETS,
            tag_keys=by_route,
        )
        self.ttft = metrics.Histogram(
            "mistral_serve_time_to_first_token_seconds",
            description="Time from a streamed request's arrival to its first token at the gateway.",
            boundaries=TTFT_BUCKETS,
            tag_keys=by_route,
        )
        self.tpot = metrics.Histogram(
            "mistral_serve_time_per_output_token_seconds",
            description="Mean time per output token after the first, of a streamed request.",
            boundaries=TPOT_BUCKETS,
            tag_keys=by_route,
        )
        self.queue = metrics.Histogram(
            "mistral_serve_queue_wait_seconds",
            description="Time a request waited at the gateway for a model replica to take it.",
            boundaries=QUEUE_BUCKETS,
            tag_keys=by_model,
        )
        self.prompt_tokens = metrics.Counter(
            "mistral_serve_prompt_tokens",
            description="Prompt tokens of answered requests, by model and LoRA adapter.",
            tag_keys=by_adapter,
        )
        self.completion_tokens = metrics.Counter(
            "mistral_serve_completion_tokens",
            description="Generated tokens of answered requests, by model and LoRA adapter.",
            tag_keys=by_adapter,
        )
        self.in_flight = metrics.Gauge(
            "mistral_serve_requests_in_flight",
            description="Requests this gateway replica is handling.",
            tag_keys=by_model,
        )


GAUGE_PERIOD_S = 1.0  # Ray drops a gauge value not set again within two export intervals


class Telemetry:
    """The gateway's metrics and access log; one per ingress replica."""

    def __init__(
        self, models: Iterable[str] = (), *, access_log: bool = True, log_request_text: bool = False
    ) -> None:
        self._metrics = _GatewayMetrics()
        self._in_flight: Tally[str] = Tally({model: 0 for model in models})
        self._log_text = log_request_text
        self._access = _access_logger() if access_log else None
        self._reporter: asyncio.Task[None] | None = None

    async def _report_in_flight(self) -> None:
        while True:
            for model, count in list(self._in_flight.items()):
                self._metrics.in_flight.set(count, tags={"model": model})
            await asyncio.sleep(GAUGE_PERIOD_S)

    def begin(self, request_id: str, route: str) -> RequestRecord:
        if self._reporter is None:  # the first request runs on the replica's event loop
            self._reporter = asyncio.get_running_loop().create_task(self._report_in_flight())
        record = RequestRecord(request_id=request_id, route=route)
        if self._log_text:
            record.response_text = []
        return record

    def routed(self, record: RequestRecord, model: str, body: bytes) -> None:
        """The request names a served model: it counts as in flight for that model."""
        record.model = model
        record.in_flight = True
        self._in_flight[model] += 1
        self._metrics.in_flight.set(self._in_flight[model], tags={"model": model})
        if self._log_text:
            record.request_text = body.decode("utf-8", "replace")

    def finish(self, record: RequestRecord) -> None:
        """Record a finished (answered, failed or cancelled) request."""
        m = self._metrics
        model = record.model
        if record.in_flight:
            record.in_flight = False
            self._in_flight[model] -= 1
            m.in_flight.set(self._in_flight[model], tags={"model": model})
        status = CLIENT_CLOSED if record.cancelled else record.status
        duration = time.perf_counter() - record.start
        adapter = {"model": model, "adapter": record.adapter}
        m.requests.inc(tags={**adapter, "route": record.route, "status": str(status)})
        route_tags = {"model": model, "route": record.route}
        m.duration.observe(duration, tags=route_tags)
        if record.accepted is not None:
            m.queue.observe(record.accepted - record.start, tags={"model": model})
        if (ttft := record.ttft_s) is not None:
            m.ttft.observe(ttft, tags=route_tags)
        if (tpot := record.tpot_s) is not None:
            m.tpot.observe(tpot, tags=route_tags)
        if record.usage is not None:
            if record.usage.prompt_tokens:
                m.prompt_tokens.inc(record.usage.prompt_tokens, tags=adapter)
            if record.usage.completion_tokens:
                m.completion_tokens.inc(record.usage.completion_tokens, tags=adapter)
        if self._access is not None:
            self._access.info(json.dumps(access_entry(record, status, duration), ensure_ascii=False))


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def access_entry(record: RequestRecord, status: int, duration: float) -> dict[str, Any]:
    """The access-log entry of one request; text only if it was collected (log_request_text)."""
    usage = record.usage
    entry: dict[str, Any] = {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "request_id": record.request_id,
        "model": record.model,
        "adapter": record.adapter or None,
        "route": record.route,
        "status": status,
        "stream": record.stream,
        "prompt_tokens": usage.prompt_tokens if usage else None,
        "completion_tokens": usage.completion_tokens if usage else None,
        "queue_s": _rounded(None if record.accepted is None else record.accepted - record.start),
        "ttft_s": _rounded(record.ttft_s),
        "duration_s": _rounded(duration),
        "cancelled": record.cancelled,
    }
    if record.error:
        entry["error"] = record.error
    if record.request_text is not None:
        entry["request"] = record.request_text
    if record.response_text is not None:
        entry["response"] = b"".join(record.response_text).decode("utf-8", "replace")
    return entry


def _access_logger() -> logging.Logger:
    """A logger writing bare JSON lines to stdout (Ray keeps a worker's stdout in its log
    directory and streams it to the driver)."""
    logger = logging.getLogger(ACCESS_LOGGER)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    if not any(isinstance(h, _AccessLines) for h in logger.handlers):
        handler = _AccessLines(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    return logger


class _AccessLines(logging.StreamHandler):  # type: ignore[type-arg]
    """The access log's own handler (other handlers may be added beside it)."""


class EngineGauges:
    """A model replica's engine load as Ray gauges, and its prefix cache's lookups as counters
    (prompt tokens looked up, and found: their rates' ratio is the hit rate), labelled by model
    and replica."""

    def __init__(self, model: str, replica: str) -> None:
        from ray.util import metrics

        keys = ("model", "replica")
        self._tags = {"model": model, "replica": replica}
        self._running = metrics.Gauge(
            "mistral_serve_engine_running_requests",
            description="Requests the engine is generating.",
            tag_keys=keys,
        )
        self._waiting = metrics.Gauge(
            "mistral_serve_engine_waiting_requests",
            description="Requests queued inside the engine (no batch slot or KV cache yet).",
            tag_keys=keys,
        )
        self._kv_cache = metrics.Gauge(
            "mistral_serve_engine_kv_cache_usage",
            description="Share of the engine's KV cache in use, 0 to 1.",
            tag_keys=keys,
        )
        self._prefix_queries = metrics.Counter(
            "mistral_serve_prefix_cache_queries",
            description="Prompt tokens the engine looked up in its prefix cache (vLLM's count).",
            tag_keys=keys,
        )
        self._prefix_hits = metrics.Counter(
            "mistral_serve_prefix_cache_hits",
            description="Prompt tokens the engine found in its prefix cache (vLLM's count).",
            tag_keys=keys,
        )
        self._counted = (0, 0)  # the engine's (queries, hits) counted so far

    def update(self, stats: EngineStats) -> None:
        self._running.set(stats.running, tags=self._tags)
        self._waiting.set(stats.waiting, tags=self._tags)
        self._kv_cache.set(stats.kv_cache_usage, tags=self._tags)
        queries, hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        if queries > self._counted[0]:
            self._prefix_queries.inc(queries - self._counted[0], tags=self._tags)
        if hits > self._counted[1]:
            self._prefix_hits.inc(hits - self._counted[1], tags=self._tags)
        self._counted = (max(queries, self._counted[0]), max(hits, self._counted[1]))


WAKE_BUCKETS = [0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120, 300]


class WarmTierMetrics:
    """A model replica's warm tier (serve_app.serving.warm) as Ray metrics: whether it is awake,
    its wakes and how long they took, and its sleeps, by reason (idle, or forced to make room
    for another model on its GPU)."""

    def __init__(self, model: str, replica: str) -> None:
        from ray.util import metrics

        self._tags = {"model": model}
        self._replica_tags = {"model": model, "replica": replica}
        self._awake = metrics.Gauge(
            "mistral_serve_model_awake",
            description="1 while the replica's engine is awake, 0 while it sleeps (no series: no replica).",
            tag_keys=("model", "replica"),
        )
        self._wakes = metrics.Counter(
            "mistral_serve_model_wakes", description="Engine wake-ups.", tag_keys=("model",)
        )
        self._wake_seconds = metrics.Histogram(
            "mistral_serve_model_wake_seconds",
            description="Seconds from a request to a sleeping replica until its engine is awake "
            "(room made on the GPU included).",
            boundaries=WAKE_BUCKETS,
            tag_keys=("model",),
        )
        self._sleeps = metrics.Counter(
            "mistral_serve_model_sleeps",
            description="Engine sleeps, by reason: idle, or forced (to make room for another model).",
            tag_keys=("model", "reason"),
        )

    def awake(self, awake: bool) -> None:
        self._awake.set(1 if awake else 0, tags=self._replica_tags)

    def woke(self, seconds: float) -> None:
        self._wakes.inc(tags=self._tags)
        self._wake_seconds.observe(seconds, tags=self._tags)
        self.awake(True)

    def slept(self, forced: bool) -> None:
        self._sleeps.inc(tags={**self._tags, "reason": "forced" if forced else "idle"})
        self.awake(False)


ADAPTER_LOAD_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300]


class AdapterMetrics:
    """A model replica's LoRA adapters (serve_app.serving.adapters) as Ray metrics: requests by
    whether their adapter was already held here (`held`), had to load (`loaded`), or could not
    (`failed`), and the seconds each load took. The share of `held` is how well requests are
    routed to the replicas that hold their adapter."""

    def __init__(self, model: str, replica: str) -> None:
        from ray.util import metrics

        self._model, self._replica = model, replica
        self._requests = metrics.Counter(
            "mistral_serve_adapter_requests",
            description="Requests for a LoRA adapter at a replica, by outcome: held (loaded there "
            "already), loaded (loaded for it), failed (could not load).",
            tag_keys=("model", "replica", "outcome"),
        )
        self._load_seconds = metrics.Histogram(
            "mistral_serve_adapter_load_seconds",
            description="Seconds a replica took to load a LoRA adapter (files checked, engine load).",
            boundaries=ADAPTER_LOAD_BUCKETS,
            tag_keys=("model", "replica"),
        )

    def request(self, outcome: str) -> None:
        self._requests.inc(tags={"model": self._model, "replica": self._replica, "outcome": outcome})

    def loaded(self, seconds: float) -> None:
        self._load_seconds.observe(seconds, tags={"model": self._model, "replica": self._replica})


class BatchMetrics:
    """The batch service's requests (serve_app.serving.batches) as Ray metrics, by model: lines
    waiting for one of the model's batch slots (`queued`) and in flight (`running`), lines
    answered by outcome (`completed`: a 2xx answer; `failed`: any other, or expired), and their
    tokens."""

    def __init__(self) -> None:
        from ray.util import metrics

        self._lines = metrics.Gauge(
            "mistral_serve_batch_lines",
            description="Batch requests waiting for a slot of their model (queued) or in flight (running).",
            tag_keys=("model", "state"),
        )
        self._answered = metrics.Counter(
            "mistral_serve_batch_lines_answered",
            description="Batch requests answered, by model and outcome (completed: 2xx; failed: the rest).",
            tag_keys=("model", "outcome"),
        )
        self._tokens = metrics.Counter(
            "mistral_serve_batch_tokens",
            description="Prompt and completion tokens of answered batch requests, by model.",
            tag_keys=("model", "kind"),
        )
        self._models: set[str] = set()

    def answered(self, model: str, record: dict[str, Any]) -> None:
        self._models.add(model)
        outcome = "completed" if record.get("error") is None else "failed"
        self._answered.inc(tags={"model": model, "outcome": outcome})
        usage = ((record.get("response") or {}).get("body") or {}).get("usage")
        if isinstance(usage, dict):
            for kind in ("prompt", "completion"):
                if tokens := int(usage.get(f"{kind}_tokens") or 0):
                    self._tokens.inc(tokens, tags={"model": model, "kind": kind})

    def report(self, queued: dict[str, int], running: dict[str, int]) -> None:
        """Set the gauges: lines queued and running per model."""
        self._models |= set(queued) | set(running)
        for model in self._models:
            self._lines.set(queued.get(model, 0), tags={"model": model, "state": "queued"})
            self._lines.set(running.get(model, 0), tags={"model": model, "state": "running"})
