"""Quota arithmetic on a controlled clock: bursts, steady rates, debt, concurrency, per-model."""

from __future__ import annotations

import pytest

from serve_app.guards import quotas as q
from serve_app.guards.auth import hash_key

KEY = hash_key("alpha")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(q.time, "monotonic", c)
    return c


def _quotas(**options: object) -> q.Quotas:
    return q.Quotas(q.QuotaOptions.model_validate(options))


def test_no_limits_admit_everything(clock: Clock) -> None:
    quotas = _quotas()
    assert not quotas.enabled
    for _ in range(1000):
        assert isinstance(quotas.admit(q.ANONYMOUS, "m"), q.Admission)


def test_requests_per_minute_bursts_then_refills(clock: Clock) -> None:
    quotas = _quotas(default={"requests_per_minute": 6})
    for _ in range(6):
        assert isinstance(quotas.admit(KEY, "m"), q.Admission)
    rejected = quotas.admit(KEY, "m")
    assert isinstance(rejected, q.Rejection)
    assert rejected.retry_after_s == 10  # one request refills in 60/6 s
    assert "Request rate limit" in rejected.message
    clock.now += 9.9
    assert isinstance(quotas.admit(KEY, "m"), q.Rejection)
    clock.now += 0.2
    assert isinstance(quotas.admit(KEY, "m"), q.Admission)
    # Another key has its own budget.
    assert isinstance(quotas.admit(hash_key("beta"), "m"), q.Admission)


def test_tokens_are_charged_at_the_end_and_debt_blocks(clock: Clock) -> None:
    quotas = _quotas(default={"tokens_per_minute": 600})  # 10 tokens/s
    first = quotas.admit(KEY, "m")
    assert isinstance(first, q.Admission)
    quotas.release(first, 650)  # overdraws by 50
    rejected = quotas.admit(KEY, "m")
    assert isinstance(rejected, q.Rejection) and rejected.retry_after_s == 5
    assert "Token rate limit" in rejected.message
    clock.now += 5.1
    assert isinstance(quotas.admit(KEY, "m"), q.Admission)


def test_concurrency_frees_a_slot_on_release(clock: Clock) -> None:
    quotas = _quotas(default={"concurrent_requests": 2})
    a, b = quotas.admit(KEY, "m"), quotas.admit(KEY, "m")
    assert isinstance(a, q.Admission) and isinstance(b, q.Admission)
    rejected = quotas.admit(KEY, "m")
    assert isinstance(rejected, q.Rejection) and "concurrent" in rejected.message
    quotas.release(a, 0)
    quotas.release(a, 0)  # releasing twice frees one slot only
    assert isinstance(quotas.admit(KEY, "m"), q.Admission)
    assert isinstance(quotas.admit(KEY, "m"), q.Rejection)


def test_key_overrides_default_and_limits_one_model(clock: Clock) -> None:
    quotas = _quotas(
        default={"requests_per_minute": 100, "concurrent_requests": 5},
        keys={KEY: {"requests_per_minute": 2, "priority": 3, "models": {"big": {"concurrent_requests": 1}}}},
    )
    first = quotas.admit(KEY, "big")
    assert isinstance(first, q.Admission) and first.priority == 3
    assert "on `big`" in quotas_rejection(quotas.admit(KEY, "big"))
    assert isinstance(quotas.admit(KEY, "small"), q.Admission)  # the model limit is for `big` only
    assert "Request rate" in quotas_rejection(quotas.admit(KEY, "small"))  # the key's 2/min is spent
    # An unlisted key gets the default (5 concurrent).
    other = hash_key("gamma")
    assert all(isinstance(quotas.admit(other, "big"), q.Admission) for _ in range(5))
    assert "concurrent" in quotas_rejection(quotas.admit(other, "big"))


def quotas_rejection(result: q.Admission | q.Rejection) -> str:
    assert isinstance(result, q.Rejection), result
    return result.message


def test_each_ingress_replica_enforces_its_share() -> None:
    options = q.QuotaOptions.model_validate(
        {
            "default": {"requests_per_minute": 90, "tokens_per_minute": 3000, "concurrent_requests": 5},
            "keys": {
                KEY: {"requests_per_minute": 30, "priority": 1, "models": {"m": {"concurrent_requests": 1}}}
            },
        }
    )
    share = options.share(3)
    assert share.default.requests_per_minute == 30 and share.default.tokens_per_minute == 1000
    assert share.default.concurrent_requests == 2  # rounded up, never 0
    assert share.keys[KEY].requests_per_minute == 10 and share.keys[KEY].priority == 1
    assert share.keys[KEY].models["m"].concurrent_requests == 1
    assert options.share(1) is options


def test_quota_keys_must_be_hashes() -> None:
    with pytest.raises(ValueError, match="hashes"):
        q.QuotaOptions.model_validate({"keys": {"plain-secret": {"requests_per_minute": 1}}})
