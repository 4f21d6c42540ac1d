"""Who may send a request, whether their quota lets it in now, and what of the body is theirs
to choose.

The ingress asks, in order: `Gate.identify` (401 without a valid key), `Gate.check_origin`
(for an app with no keys on loopback: what a web page could send it is refused), `Gate.admit`
on the key's quotas (before the body is read, so that slow bodies hold the key's slots), and,
once the body names a model, `Gate.admit_to_model` (the model's own limits for the key, and
one request per sequence asked for). `Gate.rewrite` then sets what a key decides and a client
may not: its scheduling priority on models that schedule by it, and its own prefix-cache salt.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from starlette.requests import Request

from serve_app.config import AuthOptions, QuotaOptions
from serve_app.errors import ApiError
from serve_app.guards.auth import KeyChecker
from serve_app.guards.origin import check_local_origin, check_local_upload
from serve_app.guards.quotas import Admission, Quotas, Rejection


def _too_many(rejection: Rejection) -> ApiError:
    return ApiError(429, rejection.message, headers={"Retry-After": str(rejection.retry_after_s)})


def sequences(payload: Mapping[str, Any]) -> int:
    """Sequences a request asks the engine for: its prompts (completions take a list) times `n`
    (or `best_of`, where larger)."""
    prompt = payload.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list) else 1
    per_prompt = max(_count(payload.get("n")), _count(payload.get("best_of")))
    return prompts * per_prompt


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1


class Gate:
    """API keys, the keyless-origin rule and quotas of one ingress replica."""

    def __init__(self, auth: AuthOptions, quotas: QuotaOptions) -> None:
        self._keys = KeyChecker.from_options(auth)
        self._quotas = Quotas(quotas)  # this replica's share (see the builder)
        # A keyless app on loopback (serve_app.guards.origin); with keys, or serving beyond
        # loopback on purpose (allow_unauthenticated), a gateway or the key guards it.
        self._keyless_loopback = not self._keys.enabled and not auth.allow_unauthenticated

    def identify(self, request: Request) -> str:
        """The caller's identity (its key's hash, or anonymous); ApiError 401 without a valid key."""
        identity = self._keys.identify(request.headers.get("authorization"))
        if identity is None:
            raise ApiError(401, "Invalid or missing API key: send `Authorization: Bearer <key>`.")
        return identity

    def knows(self, identity: str) -> bool:
        """Whether `identity` (a key's hash, or anonymous) is still accepted: a batch's requests
        run as the key that created it, and stop being served when the key is removed."""
        return self._keys.knows(identity)

    def check_origin(self, request: Request, *, has_body: bool, upload: bool = False) -> None:
        """ApiError 421/415 for what a web page could send a keyless app on loopback; `upload`:
        the body is a multipart file upload (serve_app.guards.origin.check_local_upload)."""
        if not self._keyless_loopback:
            return
        if upload:
            check_local_upload(request.headers)
        else:
            check_local_origin(request.headers, has_body=has_body)

    def admit(self, identity: str) -> Admission | None:
        """Let a request of `identity` in on its key's quotas (None: no quota is configured);
        ApiError 429 with Retry-After over a limit."""
        if not self._quotas.enabled:
            return None
        admission = self._quotas.admit(identity)
        if isinstance(admission, Rejection):
            raise _too_many(admission)
        return admission

    def admit_to_model(
        self,
        admission: Admission | None,
        model_id: str,
        payload: Mapping[str, Any],
        adapter: str | None = None,
    ) -> None:
        """The body names `model_id` (or its LoRA `adapter`): hold the request to their limits
        for its key, and charge it one request per sequence it asks for; ApiError 429 over a limit."""
        if admission is None:
            return
        rejection = self._quotas.admit_to_model(admission, model_id, sequences(payload), adapter)
        if rejection is not None:
            raise _too_many(rejection)

    def release(self, admission: Admission, tokens: int) -> None:
        """The request let in by `admission` ended, having used `tokens`."""
        self._quotas.release(admission, tokens)

    def rewrite(
        self,
        body: bytes,
        payload: dict[str, Any],
        identity: str,
        admission: Admission | None,
        *,
        generates: bool,
        priority_scheduling: bool,
        batch_priority: int | None = None,
    ) -> bytes:
        """The body with what the key decides in place of what the client sent: its scheduling
        priority (for a model that schedules by it) and, where keys are configured, a prefix-cache
        salt of its own, so that no key can tell another's prompts by how fast they start.
        `batch_priority`: that of a batch's request, which runs at it or at its key's, whichever
        comes later (vLLM runs lower numbers first)."""
        fields: dict[str, Any] = {}
        if not generates:
            return body
        own = admission.priority if admission is not None else None
        if batch_priority is not None:
            own = batch_priority if own is None else max(own, batch_priority)
        if priority_scheduling and own is not None:
            fields["priority"] = own
        if self._keys.enabled:
            fields["cache_salt"] = cache_salt(identity)
        if not fields:
            return body
        payload.update(fields)
        return json.dumps(payload).encode()


def cache_salt(identity: str) -> str:
    """A key's prefix-cache salt: derived from its hash, never showing it."""
    return hashlib.sha256(f"mistral-serve prefix cache: {identity}".encode()).hexdigest()[:32]
