"""The Batch API's formats: an input file's lines as checked at upload, and the output and error
lines a batch writes, as OpenAI's Batch API defines them.

An input line is `{"custom_id", "method": "POST", "url", "body"}`, one JSON object per line.
A file that is not that (not UTF-8 JSONL, a line without a unique `custom_id`, a URL other than
the two served, a streamed request, a body over the request bound, more lines than allowed) is
refused at upload with a 400 that names the first bad line. What only the app can tell (the
model exists, the key may use it, vLLM accepts the body) is each line's own answer.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from serve_app.engine.protocol import Route
from serve_app.errors import ApiError
from serve_app.guards.limits import decode_body

# What a batch line may ask for, and the route each is served by.
ENDPOINTS: dict[str, Route] = {"/v1/chat/completions": Route.CHAT, "/v1/completions": Route.COMPLETION}
COMPLETION_WINDOWS = {"24h": 24 * 3600}
MAX_CUSTOM_ID_CHARS = 512
MAX_METADATA_PAIRS = 16  # OpenAI's bounds on `metadata`: 16 pairs, keys 64 and values 512 chars
MAX_FILENAME_CHARS = 255


@dataclass(frozen=True)
class InputSummary:
    """What the upload check found in a batch input file."""

    lines: int
    urls: tuple[str, ...]  # the distinct URLs its lines ask for
    models: tuple[str, ...]  # the distinct models its lines name


@dataclass(frozen=True)
class BatchLine:
    """One request of a batch: its 0-based index among the file's requests."""

    index: int
    custom_id: str
    url: str
    body: bytes  # the request body as sent to the route, re-encoded from the parsed line
    model: str


def new_id(prefix: str) -> str:
    """An id as OpenAI's look: `file-...`, `batch_...`, `batch_req_...`."""
    return f"{prefix}{secrets.token_hex(12)}"


def _bad(line_no: int, message: str) -> ApiError:
    return ApiError(400, f"Line {line_no} of the file: {message}", param="file")


def parse_lines(data: bytes, *, max_lines: int, max_body_bytes: int) -> list[BatchLine]:
    """Every request of a batch input file, in order; ApiError 400 naming the first bad line.
    Blank lines are skipped; `line_no` in errors counts every line of the file from 1."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"The file is not UTF-8 text (byte {exc.start}).", param="file") from None
    lines: list[BatchLine] = []
    seen: set[str] = set()
    for line_no, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(lines) >= max_lines:
            raise ApiError(400, f"The file holds more than {max_lines} requests.", param="file")
        lines.append(_parse_line(raw, line_no, len(lines), seen, max_body_bytes))
    if not lines:
        raise ApiError(400, "The file holds no requests.", param="file")
    return lines


def _parse_line(raw: str, line_no: int, index: int, seen: set[str], max_body_bytes: int) -> BatchLine:
    try:
        item = decode_body(raw.encode())  # the same JSON rules as a request body's
    except ApiError as exc:
        raise _bad(line_no, exc.message) from None
    if not isinstance(item, dict):
        raise _bad(line_no, "not a JSON object.")
    unknown = set(item) - {"custom_id", "method", "url", "body"}
    if unknown:
        raise _bad(line_no, f"unknown field '{sorted(unknown)[0][:64]}'.")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not 1 <= len(custom_id) <= MAX_CUSTOM_ID_CHARS:
        raise _bad(line_no, f"'custom_id' must be a string of 1 to {MAX_CUSTOM_ID_CHARS} characters.")
    if custom_id in seen:
        raise _bad(line_no, "'custom_id' repeats an earlier line's; each must be unique.")
    seen.add(custom_id)
    if item.get("method") != "POST":
        raise _bad(line_no, "'method' must be \"POST\".")
    url = item.get("url")
    if url not in ENDPOINTS:
        shown = url[:100] if isinstance(url, str) else repr(url)[:100]
        raise _bad(line_no, f"'url' {shown!r} is not served in batches; use one of {', '.join(ENDPOINTS)}.")
    body = item.get("body")
    if not isinstance(body, dict):
        raise _bad(line_no, "'body' must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad(line_no, "'body.model' must be a model's name.")
    if body.get("stream") is True:
        raise _bad(line_no, "'body.stream' cannot be true in a batch.")
    encoded = json.dumps(body, ensure_ascii=False).encode()
    if len(encoded) > max_body_bytes:
        raise _bad(line_no, f"'body' is {len(encoded)} bytes, over the {max_body_bytes}-byte limit.")
    return BatchLine(index, custom_id, url, encoded, model)


def summarize(lines: list[BatchLine]) -> InputSummary:
    return InputSummary(
        lines=len(lines),
        urls=tuple(sorted({line.url for line in lines})),
        models=tuple(sorted({line.model for line in lines})),
    )


def check_metadata(metadata: Any) -> dict[str, str] | None:
    """A batch's `metadata`, within OpenAI's bounds; ApiError 400 otherwise."""
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > MAX_METADATA_PAIRS:
        raise ApiError(400, f"'metadata' must be an object of at most {MAX_METADATA_PAIRS} pairs.")
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > 64 or len(value) > 512:
            raise ApiError(400, "'metadata' keys are at most 64 characters, values strings of at most 512.")
    return dict(metadata)


# --- what a batch writes ----------------------------------------------------------------------


@dataclass(frozen=True)
class LineAnswer:
    """The app's answer to one batch request, as the ingress gives it (serve_app.serving.ingress)."""

    status: int
    body: bytes
    request_id: str
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def retry(self) -> bool:
        """An answer that says "not now" (a quota, no replica free): sent again later, not written."""
        return self.status in (429, 503)


def output_record(line: BatchLine, answer: LineAnswer) -> dict[str, Any]:
    """The output (2xx) or error line of a request the app answered."""
    try:
        body: Any = json.loads(answer.body)
    except ValueError:
        body = {"error": {"message": answer.body.decode("utf-8", "replace")[:1000]}}
    record: dict[str, Any] = {
        "id": new_id("batch_req_"),
        "custom_id": line.custom_id,
        "response": {"status_code": answer.status, "request_id": answer.request_id, "body": body},
        "error": None,
    }
    if not 200 <= answer.status < 300:
        error = body.get("error") if isinstance(body, dict) else None
        message = error.get("message") if isinstance(error, dict) else None
        record["error"] = {"code": str(answer.status), "message": str(message or "request failed")}
    return record


def unanswered_record(line: BatchLine, code: str, message: str) -> dict[str, Any]:
    """The error line of a request the batch did not send (it expired first)."""
    return {
        "id": new_id("batch_req_"),
        "custom_id": line.custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    }


def is_success(record: dict[str, Any]) -> bool:
    return record.get("error") is None
