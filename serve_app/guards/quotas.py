"""Per-key quotas: requests per minute, tokens per minute and concurrent requests.

Each limit is a token bucket that holds up to one minute of budget and refills continuously,
so a key may burst up to its per-minute figure and then goes at the steady rate.

Admission has two steps. `admit(identity)` runs before the body is read, on the key's own
limits: a slow body holds one of the key's concurrent slots, never a slot of another key.
`admit_to_model` runs once the body names its model, on the per-model limits; it charges one
request per sequence the engine will run (prompts x `n`, or `best_of`). Tokens are charged when
a request ends: its prompt and completion tokens from the engine's usage, or, for a stream the
client cut before its usage came, an estimate from the body's size and the chunks sent. A key
is admitted while its token budget is not exhausted, so one request may overdraw it, and the
next waits for the debt to refill.

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
        # `now` may be a moment older than the bucket (read before it was made): no negative refill.
        self.level = min(self.per_minute, self.level + max(0.0, now - self.updated) * self.per_minute / 60)
        self.updated = max(now, self.updated)

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

    identity: str
    scopes: tuple[_Usage, ...]
    priority: int | None
    released: bool = False


def _refusal(
    scope: _Usage, where: str, requests: int, *, sequences: int = 1, entering: bool, now: float
) -> Rejection | None:
    """Why `scope` cannot take `requests` more requests now, for a request of `sequences`
    sequences in all (None: it can). `entering`: the request takes one of its concurrent slots."""
    if entering and scope.concurrent_limit is not None and scope.concurrent >= scope.concurrent_limit:
        return Rejection(f"Too many concurrent requests for {where} (limit {scope.concurrent_limit}).", 1)
    if scope.requests is not None:
        bucket = scope.requests
        if sequences > bucket.per_minute:
            return Rejection(
                f"The request asks for {sequences} sequences; {where} may run {bucket.per_minute:g} a minute.",
                60,
            )
        bucket.refill(now)
        if (wait := bucket.wait_s(requests)) > 0:
            return Rejection(f"Request rate limit reached for {where}.", math.ceil(wait))
    if entering and scope.tokens is not None:
        scope.tokens.refill(now)
        if scope.tokens.level <= 0:
            return Rejection(
                f"Token rate limit reached for {where}.", max(1, math.ceil(scope.tokens.wait_s(0)))
            )
    return None


class Quotas:
    """The quota state of one ingress replica.

    A request is admitted in two steps: on its key's limits as soon as its key is known
    (`admit`, before its body is read, so that slow bodies hold the key's slots), then on the
    limits of the model its body names (`admit_to_model`), where it is also charged one request
    for each sequence it asks for beyond the first.
    """

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

    def admit(self, identity: str) -> Admission | Rejection:
        """Let a request of `identity` in on its key's limits, or say when to retry."""
        options = self._options
        key_quota = options.keys.get(identity)
        limits = key_quota.merged(options.default) if key_quota else options.default
        scope = self._scope(identity, None, limits)
        if (refusal := _refusal(scope, "this API key", 1, entering=True, now=time.monotonic())) is not None:
            return refusal
        _take(scope, 1)
        return Admission(identity, (scope,), key_quota.priority if key_quota else None)

    def admit_to_model(
        self, admission: Admission, model: str, sequences: int = 1, adapter: str | None = None
    ) -> Rejection | None:
        """Admit a request let in by `admission` on `model`'s own limits for its key (and on
        the LoRA `adapter`'s, which the key's `models` may name as a model), charging each
        scope one request per sequence beyond the first; None when admitted. A refusal
        charges nothing more; the caller releases `admission` as for any request that ends."""
        key_quota = self._options.keys.get(admission.identity)
        now = time.monotonic()
        extra = max(0, sequences - 1)
        (key_scope,) = admission.scopes
        steps = [(key_scope, "this API key", extra, False)]
        for name in (model, adapter):
            if key_quota and name is not None and name in key_quota.models:
                scope = self._scope(admission.identity, name, key_quota.models[name])
                steps.append((scope, f"this API key on `{name}`", sequences, True))
        for scope, where, requests, entering in steps:
            refusal = _refusal(scope, where, requests, sequences=sequences, entering=entering, now=now)
            if refusal is not None:
                return refusal
        for scope, _, requests, entering in steps:
            _take(scope, requests, entering=entering)
        admission.scopes = tuple(scope for scope, *_ in steps)
        return None

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


def _take(scope: _Usage, requests: int, *, entering: bool = True) -> None:
    if entering:
        scope.concurrent += 1
    if scope.requests is not None:
        scope.requests.level -= requests
