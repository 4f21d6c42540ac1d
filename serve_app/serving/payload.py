"""Reading a request's body at the ingress: only what routing needs, within the bounds.

The ingress checks the headers' size, the body's size (before reading it when the client
declares it, and as it arrives otherwise: a body sent without a length is never read past the
limit), the time the body takes to arrive, and that it is one UTF-8 JSON object. The model
replica then validates it with vLLM's own request model and checks the bounds on what that
model parsed (serve_app.guards.limits).
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.requests import Request

from serve_app.config import RequestLimits
from serve_app.errors import ApiError
from serve_app.guards.limits import check_body_size, check_headers, decode_body


async def read_payload(request: Request, limits: RequestLimits) -> tuple[bytes, dict[str, Any]]:
    """The raw body of `request` and its JSON object; ApiError (400, 408, 413) if out of bounds."""
    check_headers(request.headers.items(), limits)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit():
        check_body_size(int(declared), limits)  # before reading it
    try:
        body = await asyncio.wait_for(_read_body(request, limits), timeout=limits.max_body_seconds)
    except TimeoutError:
        raise ApiError(
            408, f"The request body did not arrive within {limits.max_body_seconds:g} s."
        ) from None
    payload = decode_body(body)
    if not isinstance(payload, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body, payload


async def _read_body(request: Request, limits: RequestLimits) -> bytes:
    """The body as it arrives, refused as soon as it is over the limit."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        check_body_size(size, limits, so_far=True)
        chunks.append(chunk)
    return b"".join(chunks)
