"""Running one batch: its requests sent through the ingress at low priority, a bounded number
per model at a time, every answer written to the store once.

A request is written when the app answered it (any status but "not now": a 429 or 503, or a
replica or ingress that died on the way, is sent again after a growing wait). Answers reach the
store in parts, every `FLUSH_S` or `FLUSH_LINES`; a batch that starts again (its service
replica restarted, or the whole app) reads its parts back and sends only what no part holds, so
each line gets exactly one output or error line. A request answered but not yet written when
the service died is sent again: the engine does the work twice, the output holds it once.

When every line has its answer (or the batch is cancelled, or it expired), the parts are joined
in the input's order into the output file (2xx answers) and the error file (the rest), whose
ids derive from the batch's, so that finishing twice after a crash writes the same two files.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from serve_app.config import BatchOptions
from serve_app.engine.protocol import Route
from serve_app.serving.batches.format import (
    ENDPOINTS,
    BatchLine,
    LineAnswer,
    is_success,
    output_record,
    unanswered_record,
)
from serve_app.serving.batches.store import BatchStore

logger = logging.getLogger("ray.serve")

FLUSH_S = 1.0
FLUSH_LINES = 500
FIRST_RETRY_S = 0.5

# Sends one request of a batch: (owner, route, body, request id) -> the app's answer.
Send = Callable[[str, Route, bytes, str], Awaitable[LineAnswer]]

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
FINAL = ("completed", "failed", "expired", "cancelled")


def output_file_id(batch_id: str, kind: str) -> str:
    """The id of a batch's output (`kind` "output") or error file: the same on every finish."""
    return "file-" + hashlib.sha256(f"{batch_id}/{kind}".encode()).hexdigest()[:24]


@dataclass
class ModelSlots:
    """How many batch requests each model, and all models together, may have in flight, over
    every batch."""

    per_model: int
    total: int | None = None  # None: no bound over all models
    _slots: dict[str, asyncio.Semaphore] = field(default_factory=dict)
    _all: asyncio.Semaphore | None = None
    running: dict[str, int] = field(default_factory=dict)
    queued: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.total is not None:
            self._all = asyncio.Semaphore(self.total)

    @contextlib.asynccontextmanager
    async def hold(self, model: str) -> Any:
        slot = self._slots.setdefault(model, asyncio.Semaphore(self.per_model))
        async with slot, self._all or contextlib.nullcontext():  # always in this order: no deadlock
            self.running[model] = self.running.get(model, 0) + 1
            try:
                yield
            finally:
                self.running[model] -= 1


@dataclass
class Progress:
    """A batch's answered lines, by index, and its token counts."""

    records: dict[int, dict[str, Any]] = field(default_factory=dict)
    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def add(self, index: int, record: dict[str, Any]) -> bool:
        """Count a line's record; False if the line has one already (it is then dropped)."""
        if index in self.records:
            return False
        self.records[index] = record
        if is_success(record):
            self.completed += 1
        else:
            self.failed += 1
        usage = ((record.get("response") or {}).get("body") or {}).get("usage")
        if isinstance(usage, dict):
            self.input_tokens += int(usage.get("prompt_tokens") or 0)
            self.output_tokens += int(usage.get("completion_tokens") or 0)
        return True


class BatchRun:
    """One batch from where its store says it stands to its output files."""

    def __init__(
        self,
        meta: dict[str, Any],
        lines: list[BatchLine],
        store: BatchStore,
        send: Send,
        slots: ModelSlots,
        options: BatchOptions,
        model_of: Callable[[str], str] = lambda name: name,
        on_answer: Callable[[str, dict[str, Any]], None] = lambda _model, _record: None,
        write_file: Callable[[str, str, bytes], None] = lambda _id, _name, _data: None,
    ) -> None:
        """`model_of(name)`: the model id a line's `model` names (for the per-model slots and
        metrics); `on_answer(model, record)`: each line's answer as it comes; `write_file(id,
        filename, data)`: an output file of the batch, its owner the batch's."""
        self.meta = meta
        self.id: str = meta["id"]
        self._lines = lines
        self._store = store
        self._send = send
        self._slots = slots
        self._options = options
        self._model_of = model_of
        self._on_answer = on_answer
        self._write_file = write_file
        self._route = ENDPOINTS[meta["endpoint"]]
        self.progress = Progress()
        self._unwritten: list[dict[str, Any]] = []
        self._stopping = False
        self._workers: list[asyncio.Task[None]] = []

    # --- the batch's object -------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The batch object with its live counts."""
        meta = dict(self.meta)
        meta["request_counts"] = {
            "total": len(self._lines),
            "completed": self.progress.completed,
            "failed": self.progress.failed,
        }
        p = self.progress
        meta["usage"] = {
            "input_tokens": p.input_tokens,
            "output_tokens": p.output_tokens,
            "total_tokens": p.input_tokens + p.output_tokens,
        }
        return meta

    def _save_meta(self) -> None:
        self.meta = self.snapshot()
        self._store.put_json(f"batches/{self.id}/meta.json", self.meta)

    def _set_status(self, status: str) -> None:
        self.meta["status"] = status
        self.meta[f"{status}_at"] = int(time.time())
        self._save_meta()

    def cancel(self) -> None:
        """Send nothing more; requests in flight are cancelled, and the batch finishes as cancelled."""
        if self.meta["status"] in FINAL:
            return
        self._stopping = True
        if self.meta["status"] != "cancelling":
            self._set_status("cancelling")
        for worker in self._workers:
            worker.cancel()

    # --- running ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Send every line without an answer yet, then write the output files."""
        self._read_parts()
        if self.meta["status"] == "validating":
            self._set_status("in_progress")
        self._stopping = self.meta["status"] in ("cancelling", "finalizing")
        queues: dict[str, deque[BatchLine]] = {}
        for line in self._lines:
            if line.index not in self.progress.records:
                queues.setdefault(self._model_of(line.model), deque()).append(line)
        flusher = asyncio.create_task(self._flush_every(FLUSH_S))
        try:
            self._workers = [
                asyncio.create_task(self._work(model, queue))
                for model, queue in queues.items()
                for _ in range(min(len(queue), self._options.max_in_flight_per_model))
            ]
            for model, queue in queues.items():
                self._slots.queued[model] = self._slots.queued.get(model, 0) + len(queue)
            await asyncio.gather(*self._workers, return_exceptions=True)
            for model, queue in queues.items():
                self._slots.queued[model] -= len(queue)  # lines left when cancelled
        finally:
            flusher.cancel()
            self._flush()
        self._finish()

    async def _work(self, model: str, queue: deque[BatchLine]) -> None:
        while queue and not self._stopping:
            line = queue.popleft()
            self._slots.queued[model] -= 1
            if self._expired():
                self._record(
                    model, line.index, unanswered_record(line, "batch_expired", "The batch expired.")
                )
                continue
            async with self._slots.hold(model):
                answer = await self._answer(line)
            self._record(model, line.index, output_record(line, answer))

    def _expired(self) -> bool:
        return time.time() >= self.meta["expires_at"]

    async def _answer(self, line: BatchLine) -> LineAnswer:
        """The app's answer to `line`, asked again while it says "not now"."""
        wait = FIRST_RETRY_S
        attempt = 0
        while True:
            attempt += 1
            request_id = f"{self.id}-{line.index}-{attempt}"
            try:
                answer = await self._send(self.meta["owner"], self._route, line.body, request_id)
                if not answer.retry:
                    return answer
                why = f"status {answer.status}"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # an ingress or replica that died on the way
                why = repr(exc)[:200]
            logger.info("batch %s line %d: %s; again in %.1f s", self.id, line.index, why, wait)
            await asyncio.sleep(wait)
            wait = min(wait * 2, self._options.retry_max_s)

    def _record(self, model: str, index: int, record: dict[str, Any]) -> None:
        record["_line"] = index
        if self.progress.add(index, record):
            self._unwritten.append(record)
            self._on_answer(model, record)
        if len(self._unwritten) >= FLUSH_LINES:
            self._flush()

    async def _flush_every(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            self._flush()

    def _flush(self) -> None:
        """Write the answers not yet written as one part, then the progress."""
        if not self._unwritten:
            return
        records, self._unwritten = self._unwritten, []
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
        self._store.put(f"batches/{self.id}/parts/{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.jsonl", data)
        self._save_meta()

    def _read_parts(self) -> None:
        for name in self._store.children(f"batches/{self.id}/parts"):
            for raw in self._store.get(f"batches/{self.id}/parts/{name}").splitlines():
                if raw.strip():
                    record = json.loads(raw)
                    self.progress.add(int(record["_line"]), record)

    # --- finishing ----------------------------------------------------------------------------

    def _finish(self) -> None:
        status = self.meta["status"]
        if status == "cancelling":
            final = "cancelled"
        elif len(self.progress.records) < len(self._lines):
            return  # stopped by the service's shutdown: the next start resumes it
        elif any(
            (r.get("error") or {}).get("code") == "batch_expired" for r in self.progress.records.values()
        ):
            final = "expired"
        else:
            final = "completed"
        if status != "finalizing" and final == "completed":
            self._set_status("finalizing")
        outputs, errors = self._split(self.progress.records.values())
        for kind, data in (("output", outputs), ("error", errors)):
            if data:
                file_id = output_file_id(self.id, kind)
                self._write_file(file_id, f"{self.id}_{kind}.jsonl", data)
                self.meta[f"{kind}_file_id"] = file_id
        self._set_status(final)
        self._store.delete(f"batches/{self.id}/parts")
        logger.info(
            "batch %s %s: %d completed, %d failed of %d",
            self.id,
            final,
            self.progress.completed,
            self.progress.failed,
            len(self._lines),
        )

    @staticmethod
    def _split(records: Iterable[dict[str, Any]]) -> tuple[bytes, bytes]:
        """The output and error files' bytes, in the input's order."""
        ordered = sorted(records, key=lambda r: int(r["_line"]))
        out: list[str] = []
        err: list[str] = []
        for record in ordered:
            line = json.dumps({k: v for k, v in record.items() if k != "_line"}, ensure_ascii=False) + "\n"
            (out if is_success(record) else err).append(line)
        return "".join(out).encode(), "".join(err).encode()


def model_map(names: Mapping[str, str]) -> Callable[[str], str]:
    """The model id of each name a line may use (aliases and adapters map to their base)."""
    return lambda name: names.get(name, name)
