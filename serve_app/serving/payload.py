"""Reading a request's body at the ingress: only what routing needs, within the bounds.

The ingress checks the headers' size, the body's size (before reading it when the client
declares it) and that the body is one UTF-8 JSON object; the model replica then validates it
with vLLM's own request model and checks the bounds on what that model parsed
(serve_app.guards.limits).
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from serve_app.config import RequestLimits
from serve_app.errors import ApiError
from serve_app.guards.limits import check_body_size, check_headers, decode_body


async def read_payload(request: Request, limits: RequestLimits) -> tuple[bytes, dict[str, Any]]:
    """The raw body of `request` and its JSON object; ApiError (400, 413) if out of bounds."""
    check_headers(request.headers.items(), limits)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit():
        check_body_size(int(declared), limits)  # before reading it
    body = await request.body()
    check_body_size(len(body), limits)
    payload = decode_body(body)
    if not isinstance(payload, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body, payload
