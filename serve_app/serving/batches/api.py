"""The ingress's side of the Batch API: `/v1/files` and `/v1/batches` read and bounded here, and
answered by the batch service (serve_app.serving.batches.service).

An upload is read whole within `batches.max_file_bytes` (refused as soon as it is over, and
at once when the client declares a larger length) and `batches.max_file_seconds`; it must be
multipart/form-data with one `file` and a `purpose`, as OpenAI's clients send it. The service
checks the file's lines.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Mapping
from typing import Any

from ray.serve.handle import DeploymentHandle
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from serve_app.config import BatchOptions
from serve_app.errors import ApiError
from serve_app.serving.batches.format import check_metadata
from serve_app.serving.batches.service import Refusal
from serve_app.serving.payload import read_body

MULTIPART_OVERHEAD = 65_536  # the form's own bytes around the file: boundaries, part headers, purpose
MAX_QUERY_CHARS = 128


async def answer(response: Awaitable[Any]) -> Any:
    """The service's answer, or the ApiError it refused with."""
    result = await response
    if isinstance(result, Refusal):
        raise result.error()
    return result


class BatchApi:
    """Calls of the Batch API for one ingress replica."""

    def __init__(self, service: DeploymentHandle | None, options: BatchOptions) -> None:
        self._service = service
        self._options = options

    def check_enabled(self) -> None:
        if self._service is None:
            raise ApiError(404, "Not Found")

    @property
    def service(self) -> DeploymentHandle:
        self.check_enabled()
        assert self._service is not None
        return self._service

    async def upload(self, request: Request, owner: str) -> dict[str, Any]:
        filename, purpose, data = await read_upload(request, self._options)
        return await answer(self.service.create_file.remote(owner, filename, purpose, data))

    async def create_batch(self, payload: Mapping[str, Any], owner: str, served: list[str]) -> dict[str, Any]:
        input_file_id = _text(payload, "input_file_id")
        endpoint = _text(payload, "endpoint")
        window = _text(payload, "completion_window")
        metadata = check_metadata(payload.get("metadata"))
        created = self.service.create_batch.remote(owner, input_file_id, endpoint, window, metadata, served)
        return await answer(created)

    async def call(self, method: str, owner: str, *args: Any) -> Any:
        """One of the service's calls on the key's own objects (get_file, list_batches, ...)."""
        return await answer(getattr(self.service, method).remote(owner, *args))


def _text(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not value or len(value) > MAX_QUERY_CHARS:
        raise ApiError(
            400, f"'{name}' must be given, as a string of at most {MAX_QUERY_CHARS} characters.", param=name
        )
    return value


def query_limit(request: Request, default: int) -> int:
    """The `limit` query parameter; ApiError 400 if it is not a whole number."""
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or len(raw) > 6:
        raise ApiError(400, "'limit' must be a whole number.", param="limit")
    return int(raw)


def query_text(request: Request, name: str) -> str | None:
    value = request.query_params.get(name)
    if value is not None and len(value) > MAX_QUERY_CHARS:
        raise ApiError(400, f"'{name}' is longer than {MAX_QUERY_CHARS} characters.", param=name)
    return value


async def read_upload(request: Request, options: BatchOptions) -> tuple[str, str, bytes]:
    """The uploaded file's name, its `purpose` and its bytes; ApiError 400/408/413 otherwise."""
    limit = options.max_file_bytes + MULTIPART_OVERHEAD

    def check_size(size: int, so_far: bool) -> None:
        if size > limit:
            raise ApiError(
                413, f"The file is over the {options.max_file_bytes}-byte limit (batches.max_file_bytes)."
            )

    body = await read_body(request, check_size, options.max_file_seconds)

    async def stream() -> AsyncGenerator[bytes, None]:
        yield body

    try:
        form = await MultiPartParser(request.headers, stream(), max_files=1, max_fields=4).parse()
    except MultiPartException as exc:
        raise ApiError(400, f"The upload is not a valid multipart form: {exc.message}") from None
    upload = form.get("file")
    purpose = form.get("purpose")
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "The form must hold the file in its 'file' field.", param="file")
    if not isinstance(purpose, str):
        raise ApiError(400, "The form must say the file's 'purpose' ('batch').", param="purpose")
    data = await upload.read()
    await upload.close()
    if len(data) > options.max_file_bytes:
        raise ApiError(413, f"The file is {len(data)} bytes; the limit is {options.max_file_bytes} bytes.")
    return upload.filename or "upload.jsonl", purpose, data
