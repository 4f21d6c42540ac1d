"""Per-key quotas: requests per minute, tokens per minute and concurrent requests.

Each limit is a token bucket that holds up to one minute of budget and refills continuously,
so a key may burst up to its per-minute figure and then goes at the steady rate. Tokens are
charged when a request ends (its prompt and completion tokens); a key is admitted while its
token budget is not exhausted, so one request may overdraw it, and the next waits for the
debt to refill. Limits apply per key and, where the config says so, per key and model.

Each ingress replica enforces its share of every limit (the limit divided by the number of
ingress replicas, see `QuotaOptions.share`); Serve's proxies spread requests over the
ingress replicas, so the sum is close to the configured figure.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from serve_app.config import KeyQuota, QuotaLimits, QuotaOptions
from serve_app.guards.auth import ANONYMOUS

__all__ = ["ANONYMOUS", "Admission", "KeyQuota", "QuotaLimits", "QuotaOptions", "Quotas", "Rejection"]


@dataclass
class _Bucket:
    """A token bucket holding one minute of `per_minute`; its level may go negative (debt)."""

    per_minute: float
    level: float = field(init=False)
    updated: float = field(init=False)

    def __post_init__(self) -> None:
        self.level = self.per_minute
        self.updated = time.monotonic()

    def refill(self, now: float) -> None:
        self.level = min(self.per_minute, self.level + (now - self.updated) * self.per_minute / 60)
        self.updated = now

    def wait_s(self, need: float) -> float:
        """Seconds until the level reaches `need` (0: it has)."""
        return max(0.0, (need - self.level) * 60 / self.per_minute)


@dataclass
class _Usage:
    """What one key (on one model, or on all) is using."""

    requests: _Bucket | None
    tokens: _Bucket | None
    concurrent_limit: int | None
    concurrent: int = 0


@dataclass(frozen=True)
class Rejection:
    message: str
    retry_after_s: int


@dataclass
class Admission:
    """A request let in: hand it back to `Quotas.release` when it ends."""

    scopes: tuple[_Usage, ...]
    priority: int | None
    released: bool = False


class Quotas:
    """The quota state of one ingress replica."""

    def __init__(self, options: QuotaOptions) -> None:
        self._options = options
        self._usage: dict[tuple[str, str], _Usage] = {}

    @property
    def enabled(self) -> bool:
        return self._options.enabled

    def _scope(self, identity: str, model: str | None, limits: QuotaLimits) -> _Usage:
        key = (identity, model or "*")
        usage = self._usage.get(key)
        if usage is None:
            rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
            usage = _Usage(
                requests=_Bucket(rpm) if rpm else None,
                tokens=_Bucket(tpm) if tpm else None,
                concurrent_limit=limits.concurrent_requests,
            )
            self._usage[key] = usage
        return usage

    def admit(self, identity: str, model: str) -> Admission | Rejection:
        """Let a request of `identity` to `model` in, or say when to retry."""
        options = self._options
        key_quota = options.keys.get(identity)
        limits = key_quota.merged(options.default) if key_quota else options.default
        scopes = [self._scope(identity, None, limits)]
        if key_quota and model in key_quota.models:
            scopes.append(self._scope(identity, model, key_quota.models[model]))
        now = time.monotonic()
        for scope, where in zip(scopes, ("this API key", f"this API key on `{model}`"), strict=False):
            if scope.concurrent_limit is not None and scope.concurrent >= scope.concurrent_limit:
                return Rejection(
                    f"Too many concurrent requests for {where} (limit {scope.concurrent_limit}).", 1
                )
            if scope.requests is not None:
                scope.requests.refill(now)
                if (wait := scope.requests.wait_s(1)) > 0:
                    return Rejection(f"Request rate limit reached for {where}.", math.ceil(wait))
            if scope.tokens is not None:
                scope.tokens.refill(now)
                if scope.tokens.level <= 0:
                    wait = scope.tokens.wait_s(0)
                    return Rejection(f"Token rate limit reached for {where}.", max(1, math.ceil(wait)))
        for scope in scopes:
            scope.concurrent += 1
            if scope.requests is not None:
                scope.requests.level -= 1
        return Admission(tuple(scopes), key_quota.priority if key_quota else None)

    def release(self, admission: Admission, tokens: int) -> None:
        """The request ended, having used `tokens` (prompt + completion)."""
        if admission.released:
            return
        admission.released = True
        now = time.monotonic()
        for scope in admission.scopes:
            scope.concurrent -= 1
            if scope.tokens is not None and tokens:
                scope.tokens.refill(now)
                scope.tokens.level -= tokens
