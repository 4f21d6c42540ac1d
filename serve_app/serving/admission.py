"""Who may send a request, and whether their quota lets it in now.

The ingress asks `Gate.identify` on every route (401 without a valid key) and `Gate.admit`
before sending a request to a model (429 with Retry-After over a quota). A key's scheduling
priority replaces the client's on models that schedule by priority.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request

from serve_app.config import AuthOptions, QuotaOptions
from serve_app.errors import ApiError
from serve_app.guards.auth import KeyChecker
from serve_app.guards.quotas import Admission, Quotas, Rejection


class Gate:
    """API keys and quotas of one ingress replica."""

    def __init__(self, auth: AuthOptions, quotas: QuotaOptions) -> None:
        self._keys = KeyChecker.from_options(auth)
        self._quotas = Quotas(quotas)  # this replica's share (see the builder)

    def identify(self, request: Request) -> str:
        """The caller's identity (its key's hash, or anonymous); ApiError 401 without a valid key."""
        identity = self._keys.identify(request.headers.get("authorization"))
        if identity is None:
            raise ApiError(401, "Invalid or missing API key: send `Authorization: Bearer <key>`.")
        return identity

    def admit(self, identity: str, model_id: str) -> Admission | None:
        """Let a request of `identity` to `model_id` in (None: no quota is configured);
        ApiError 429 with Retry-After over a limit."""
        if not self._quotas.enabled:
            return None
        admission = self._quotas.admit(identity, model_id)
        if isinstance(admission, Rejection):
            raise ApiError(429, admission.message, headers={"Retry-After": str(admission.retry_after_s)})
        return admission

    def release(self, admission: Admission, tokens: int) -> None:
        """The request let in by `admission` ended, having used `tokens`."""
        self._quotas.release(admission, tokens)


def with_priority(body: bytes, payload: dict[str, Any], priority: int | None) -> bytes:
    """The body with the key's scheduling `priority` in place of the client's, if it has one."""
    if priority is None:
        return body
    payload["priority"] = priority
    return json.dumps(payload).encode()
