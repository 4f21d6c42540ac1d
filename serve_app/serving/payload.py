"""Reading a request's body at the ingress: only what routing needs, within the bounds.

The ingress checks the headers' size, the body's size (before reading it when the client
declares it, and as it arrives otherwise: a body sent without a length is never read past the
limit), the time the body takes to arrive, and that it is one UTF-8 JSON object. The model
replica then validates it with vLLM's own request model and checks the bounds on what that
model parsed (serve_app.guards.limits).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from starlette.requests import Request

from serve_app.config import RequestLimits
from serve_app.errors import ApiError
from serve_app.guards.limits import check_body_size, check_headers, decode_body


async def read_payload(request: Request, limits: RequestLimits) -> tuple[bytes, dict[str, Any]]:
    """The raw body of `request` and its JSON object; ApiError (400, 408, 413) if out of bounds."""
    check_headers(request.headers.items(), limits)
    body = await read_body(
        request, lambda size, so_far: check_body_size(size, limits, so_far=so_far), limits.max_body_seconds
    )
    return body, parse_payload(body, limits)


def parse_payload(body: bytes, limits: RequestLimits) -> dict[str, Any]:
    """The JSON object of a body already read; ApiError (400, 413) if out of bounds."""
    check_body_size(len(body), limits)
    payload = decode_body(body)
    if not isinstance(payload, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return payload


async def read_body(request: Request, check_size: Callable[[int, bool], None], max_seconds: float) -> bytes:
    """The whole body of `request`: `check_size(bytes, so_far)` raises for a declared length
    before anything is read, and as the body arrives past it; ApiError 408 after `max_seconds`."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit():
        check_size(int(declared), False)  # before reading it
    try:
        return await asyncio.wait_for(_read_body(request, check_size), timeout=max_seconds)
    except TimeoutError:
        raise ApiError(408, f"The request body did not arrive within {max_seconds:g} s.") from None


async def _read_body(request: Request, check_size: Callable[[int, bool], None]) -> bytes:
    """The body as it arrives, refused as soon as it is over the limit."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        check_size(size, True)
        chunks.append(chunk)
    return b"".join(chunks)
