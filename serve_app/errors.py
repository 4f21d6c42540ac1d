"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`.

The error types follow vLLM's OpenAI server, so clients see the same shape and the same
`type` from us as from `vllm serve`; the HTTP status always equals `error.code`. Every room
raises `ApiError` (or a subclass) for what the client did wrong or must retry; the ingress
turns it into the HTTP answer at the edge.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from http import HTTPStatus

_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    413: "BadRequestError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


def error_type(status: int) -> str:
    return _TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"


def error_body(status: int, message: str, *, param: str | None = None, err_type: str | None = None) -> bytes:
    """The JSON body of an OpenAI error response."""
    error = {
        "message": message,
        "type": err_type or error_type(status),
        "param": param,
        "code": status,
    }
    return json.dumps({"error": error}).encode()


class ApiError(Exception):
    """A request answered with an OpenAI error; `message`, `param` and `headers` are for the client."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        """The OpenAI error body of the response."""
        return error_body(self.status, self.message, param=self.param)
