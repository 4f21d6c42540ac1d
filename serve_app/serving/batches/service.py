"""The batch service: one small deployment that keeps the Batch API's files and batches in the
store and runs every batch (serve_app.serving.batches.runner).

The ingress answers `/v1/files` and `/v1/batches` by calling it; it sends each batch request
back through the ingress (`OpenAIIngress.batch_line`), so that a batch's requests pass every
check an HTTP request passes (the key, its quotas, the bounds, the model) and reach the model's
replicas at low priority. It runs as one replica: the one writer of the store. When it starts
(after a crash of its replica, or a restart of the whole app), it resumes every batch the store
holds unfinished.

Every call names the key (`owner`, the hash the ingress identified): a key sees and changes only
its own files and batches; another's ids are as unknown as ids that do not exist.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import wraps
from typing import Any, ParamSpec, TypeVar

from serve_app.config import BatchOptions, RequestLimits
from serve_app.errors import ApiError
from serve_app.serving.batches.format import (
    COMPLETION_WINDOWS,
    ENDPOINTS,
    MAX_FILENAME_CHARS,
    check_metadata,
    new_id,
    parse_lines,
    summarize,
)
from serve_app.serving.batches.runner import ACTIVE, BatchRun, ModelSlots, Send, model_map
from serve_app.serving.batches.store import BatchStore
from serve_app.serving.ray_compat import in_own_request
from serve_app.serving.telemetry import GAUGE_PERIOD_S, BatchMetrics

logger = logging.getLogger("ray.serve")

SERVICE_NAME = "BatchService"
INPUT_PURPOSE = "batch"
OUTPUT_PURPOSE = "batch_output"
MAX_LIST = 100

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class Refusal:
    """An ApiError as it crosses back to the ingress (which raises it again)."""

    status: int
    message: str
    param: str | None = None

    def error(self) -> ApiError:
        return ApiError(self.status, self.message, param=self.param)


def refusing(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R | Refusal]]:
    """A service call that answers a `Refusal` where it raises an ApiError."""

    @wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> R | Refusal:
        try:
            return await method(*args, **kwargs)
        except ApiError as error:
            return Refusal(error.status, error.message, error.param)

    return call


def public(meta: Mapping[str, Any]) -> dict[str, Any]:
    """An object as the API shows it: without its owner."""
    return {k: v for k, v in meta.items() if k != "owner"}


def _page(items: Sequence[dict[str, Any]], limit: int, after: str | None) -> dict[str, Any]:
    """OpenAI's cursor page of `items` (newest first): `limit` of them after the id `after`."""
    if not 1 <= limit <= MAX_LIST:
        raise ApiError(400, f"'limit' must be between 1 and {MAX_LIST}.", param="limit")
    start = 0
    if after is not None:
        ids = [item["id"] for item in items]
        start = ids.index(after) + 1 if after in ids else len(ids)
    data = [public(item) for item in items[start : start + limit]]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": start + limit < len(items),
    }


class BatchService:
    """Files and batches of every key, and the batches' runs."""

    async def __init__(  # type: ignore[misc]
        self,
        options: BatchOptions,
        limits: RequestLimits,
        model_ids: Mapping[str, str],
        ingress: str = "OpenAIIngress",
        send: Send | None = None,
        metrics: bool = False,
    ) -> None:
        """`model_ids`: the model id of each name a line may use (ids, aliases, the config's
        adapters); `ingress`: the deployment batch requests go through (`send` in its place
        in tests); `metrics`: export Ray metrics (serve_app.serving.telemetry.BatchMetrics)."""
        self._options = options
        self._limits = limits
        self._model_of = model_map(model_ids)
        self._ingress_name = ingress
        self._ingress: Any = None
        self._send: Send = send or self._through_ingress
        self._metrics = BatchMetrics() if metrics else None
        self._store = BatchStore(options.store)
        self._files = {m["id"]: m for m in self._read_all("files")}
        self._batches = {m["id"]: m for m in self._read_all("batches")}
        self._runs: dict[str, BatchRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = ModelSlots(options.max_in_flight_per_model, options.max_in_flight)
        for meta in sorted(self._batches.values(), key=lambda m: m["created_at"]):
            if meta["status"] in ACTIVE:
                logger.info("batch %s: resuming (%s)", meta["id"], meta["status"])
                self._start(meta)
        if self._metrics is not None:
            self._tasks.add(asyncio.create_task(self._report(self._metrics)))

    def _read_all(self, kind: str) -> list[dict[str, Any]]:
        metas = []
        for name in self._store.children(kind):
            try:
                metas.append(self._store.get_json(f"{kind}/{name}/meta.json"))
            except FileNotFoundError:  # a crash between the data and its meta: never shown
                continue
        return metas

    # --- files --------------------------------------------------------------------------------

    @refusing
    async def create_file(self, owner: str, filename: str, purpose: str, data: bytes) -> dict[str, Any]:
        if purpose != INPUT_PURPOSE:
            raise ApiError(400, f"'purpose' must be '{INPUT_PURPOSE}' (batch input files).", param="purpose")
        # Off the event loop: a large file takes a while to read, and batches run on this loop.
        lines = await asyncio.to_thread(
            parse_lines, data, max_lines=self._options.max_lines, max_body_bytes=self._limits.max_body_bytes
        )
        if sum(1 for f in self._files.values() if f["owner"] == owner) >= self._options.max_files_per_key:
            raise ApiError(
                400, f"This key keeps {self._options.max_files_per_key} files already: delete some first."
            )
        summary = summarize(lines)
        extra = {"_summary": {"lines": summary.lines, "urls": summary.urls, "models": summary.models}}
        meta = await asyncio.to_thread(
            self._add_file, new_id("file-"), owner, filename[:MAX_FILENAME_CHARS], purpose, data, extra
        )
        return public(_shown_file(meta))

    def _add_file(
        self,
        file_id: str,
        owner: str,
        filename: str,
        purpose: str,
        data: bytes,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Store a file (its data, then its meta: a file without a meta is never shown)."""
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "owner": owner,
            **(extra or {}),
        }
        self._store.put(f"files/{file_id}/data", data)
        self._store.put_json(f"files/{file_id}/meta.json", meta)
        self._files[file_id] = meta
        return meta

    def _file(self, owner: str, file_id: str) -> dict[str, Any]:
        meta = self._files.get(file_id)
        if meta is None or meta["owner"] != owner:
            raise ApiError(404, f"No such File object: {file_id[:100]}", param="file_id")
        return meta

    @refusing
    async def get_file(self, owner: str, file_id: str) -> dict[str, Any]:
        return public(_shown_file(self._file(owner, file_id)))

    @refusing
    async def file_content(self, owner: str, file_id: str) -> bytes:
        self._file(owner, file_id)
        return await asyncio.to_thread(self._store.get, f"files/{file_id}/data")

    @refusing
    async def list_files(
        self, owner: str, purpose: str | None = None, limit: int = MAX_LIST, after: str | None = None
    ) -> dict[str, Any]:
        files = [
            _shown_file(f)
            for f in sorted(self._files.values(), key=lambda f: (f["created_at"], f["id"]), reverse=True)
            if f["owner"] == owner and (purpose is None or f["purpose"] == purpose)
        ]
        return _page(files, limit, after)

    @refusing
    async def delete_file(self, owner: str, file_id: str) -> dict[str, Any]:
        self._file(owner, file_id)
        if any(b["input_file_id"] == file_id for b in self._batches.values() if b["status"] in ACTIVE):
            raise ApiError(400, f"File {file_id} is the input of a batch in progress.", param="file_id")
        del self._files[file_id]
        self._store.delete(f"files/{file_id}")
        return {"id": file_id, "object": "file", "deleted": True}

    # --- batches ------------------------------------------------------------------------------

    @refusing
    async def create_batch(
        self,
        owner: str,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None,
        served: Sequence[str],
    ) -> dict[str, Any]:
        """Start a batch of `input_file_id`'s requests to `endpoint`; `served`: every name the
        app serves now (a line naming another is refused here, not run)."""
        if endpoint not in ENDPOINTS:
            raise ApiError(400, f"'endpoint' must be one of {', '.join(ENDPOINTS)}.", param="endpoint")
        if completion_window not in COMPLETION_WINDOWS:
            raise ApiError(400, "'completion_window' must be '24h'.", param="completion_window")
        metadata = check_metadata(metadata)
        summary = self._file(owner, input_file_id).get("_summary")
        if summary is None:
            raise ApiError(400, f"File {input_file_id} is not a batch input file.", param="input_file_id")
        _check_input(summary, endpoint, set(served))
        active = sum(1 for b in self._batches.values() if b["owner"] == owner and b["status"] in ACTIVE)
        if active >= self._options.max_active_batches_per_key:
            raise ApiError(
                429, f"This key has {active} batches in progress; wait for one to finish or cancel one."
            )
        meta = _new_batch(owner, input_file_id, endpoint, completion_window, metadata, summary["lines"])
        self._store.put_json(f"batches/{meta['id']}/meta.json", meta)
        self._batches[meta["id"]] = meta
        self._start(meta)
        return public(self._runs[meta["id"]].snapshot())

    def _batch(self, owner: str, batch_id: str) -> dict[str, Any]:
        meta = self._batches.get(batch_id)
        if meta is None or meta["owner"] != owner:
            raise ApiError(404, f"No batch found with id '{batch_id[:100]}'.", param="batch_id")
        run = self._runs.get(batch_id)
        return run.snapshot() if run is not None else meta

    @refusing
    async def get_batch(self, owner: str, batch_id: str) -> dict[str, Any]:
        return public(self._batch(owner, batch_id))

    @refusing
    async def list_batches(self, owner: str, limit: int = 20, after: str | None = None) -> dict[str, Any]:
        batches = [
            self._batch(owner, b["id"])
            for b in sorted(self._batches.values(), key=lambda b: (b["created_at"], b["id"]), reverse=True)
            if b["owner"] == owner
        ]
        return _page(batches, limit, after)

    @refusing
    async def cancel_batch(self, owner: str, batch_id: str) -> dict[str, Any]:
        meta = self._batch(owner, batch_id)
        if meta["status"] not in ACTIVE:
            raise ApiError(400, f"Batch {batch_id} is {meta['status']}: it cannot be cancelled.")
        run = self._runs.get(batch_id)
        if run is not None:
            run.cancel()
        return public(self._batch(owner, batch_id))

    # --- running ------------------------------------------------------------------------------

    def _start(self, meta: dict[str, Any]) -> None:
        data = self._store.get(f"files/{meta['input_file_id']}/data")
        lines = parse_lines(
            data, max_lines=self._options.max_lines, max_body_bytes=self._limits.max_body_bytes
        )
        owner = meta["owner"]

        def write_output(file_id: str, filename: str, data: bytes) -> None:
            self._add_file(file_id, owner, filename, OUTPUT_PURPOSE, data)

        run = BatchRun(
            meta,
            lines,
            self._store,
            self._send,
            self._slots,
            self._options,
            self._model_of,
            on_answer=self._answered,
            write_file=write_output,
        )
        self._runs[meta["id"]] = run
        # Not a part of the call that started the batch (its end or cancellation is not the batch's).
        task = in_own_request(self._run(run), run.id)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, run: BatchRun) -> None:
        try:
            await run.run()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("batch %s: stopped by an error; it resumes when the service restarts", run.id)
        finally:
            self._batches[run.id] = run.snapshot()
            self._runs.pop(run.id, None)

    def _answered(self, model: str, record: dict[str, Any]) -> None:
        if self._metrics is not None:
            self._metrics.answered(model, record)

    async def _through_ingress(self, owner: str, route: Any, body: bytes, request_id: str) -> Any:
        """One batch request through the ingress, as a Serve request of its own."""
        if self._ingress is None:
            from ray import serve

            app = serve.get_replica_context().app_name
            self._ingress = serve.get_deployment_handle(self._ingress_name, app_name=app)
        ingress = self._ingress

        async def call() -> Any:
            return await ingress.batch_line.remote(owner, route, body, request_id)

        return await in_own_request(call(), request_id)

    async def _report(self, metrics: BatchMetrics) -> None:
        while True:
            try:
                metrics.report(self._slots.queued, self._slots.running)
            except Exception as exc:  # never let metrics stop the service
                logger.warning("cannot report batch metrics: %r", exc)
            await asyncio.sleep(GAUGE_PERIOD_S)

    async def check_health(self) -> None:
        self._store.children("batches")  # the store answers

    async def __del__(self) -> None:
        """Stop every run: what was answered is written; the next start resumes the rest."""
        tasks = list(getattr(self, "_tasks", ()))
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _shown_file(meta: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in meta.items() if not k.startswith("_")}


def _check_input(summary: Mapping[str, Any], endpoint: str, served: set[str]) -> None:
    """ApiError 400 where the file's lines ask for another endpoint or a model not served."""
    other = [u for u in summary["urls"] if u != endpoint]
    if other:
        raise ApiError(
            400,
            f"The file has requests to {other[0]}, but the batch's endpoint is {endpoint}: "
            "every line's 'url' must be the batch's endpoint.",
            param="input_file_id",
        )
    unknown = [m for m in summary["models"] if m not in served]
    if unknown:
        raise ApiError(
            400, f"The file names the model `{unknown[0][:100]}`, which is not served.", param="input_file_id"
        )


def _new_batch(
    owner: str,
    input_file_id: str,
    endpoint: str,
    window: str,
    metadata: dict[str, str] | None,
    total: int,
) -> dict[str, Any]:
    now = int(time.time())
    return {
        "id": new_id("batch_"),
        "object": "batch",
        "endpoint": endpoint,
        "errors": None,
        "input_file_id": input_file_id,
        "completion_window": window,
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": now,
        "in_progress_at": None,
        "expires_at": now + COMPLETION_WINDOWS[window],
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": total, "completed": 0, "failed": 0},
        "usage": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
        "metadata": metadata,
        "owner": owner,
    }
