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


def admit(quotas: q.Quotas, identity: str, model: str, sequences: int = 1) -> q.Admission | q.Rejection:
    """Both steps of admission, as the ingress takes them around reading the body."""
    admission = quotas.admit(identity)
    if isinstance(admission, q.Rejection):
        return admission
    refusal = quotas.admit_to_model(admission, model, sequences)
    if refusal is not None:
        quotas.release(admission, 0)
        return refusal
    return admission


def _quotas(**options: object) -> q.Quotas:
    return q.Quotas(q.QuotaOptions.model_validate(options))


def test_no_limits_admit_everything(clock: Clock) -> None:
    quotas = _quotas()
    assert not quotas.enabled
    for _ in range(1000):
        assert isinstance(admit(quotas, q.ANONYMOUS, "m"), q.Admission)


def test_requests_per_minute_bursts_then_refills(clock: Clock) -> None:
    quotas = _quotas(default={"requests_per_minute": 6})
    for _ in range(6):
        assert isinstance(admit(quotas, KEY, "m"), q.Admission)
    rejected = admit(quotas, KEY, "m")
    assert isinstance(rejected, q.Rejection)
    assert rejected.retry_after_s == 10  # one request refills in 60/6 s
    assert "Request rate limit" in rejected.message
    clock.now += 9.9
    assert isinstance(admit(quotas, KEY, "m"), q.Rejection)
    clock.now += 0.2
    assert isinstance(admit(quotas, KEY, "m"), q.Admission)
    # Another key has its own budget.
    assert isinstance(admit(quotas, hash_key("beta"), "m"), q.Admission)


def test_tokens_are_charged_at_the_end_and_debt_blocks(clock: Clock) -> None:
    quotas = _quotas(default={"tokens_per_minute": 600})  # 10 tokens/s
    first = admit(quotas, KEY, "m")
    assert isinstance(first, q.Admission)
    quotas.release(first, 650)  # overdraws by 50
    rejected = admit(quotas, KEY, "m")
    assert isinstance(rejected, q.Rejection) and rejected.retry_after_s == 5
    assert "Token rate limit" in rejected.message
    clock.now += 5.1
    assert isinstance(admit(quotas, KEY, "m"), q.Admission)


def test_concurrency_frees_a_slot_on_release(clock: Clock) -> None:
    quotas = _quotas(default={"concurrent_requests": 2})
    a, b = admit(quotas, KEY, "m"), admit(quotas, KEY, "m")
    assert isinstance(a, q.Admission) and isinstance(b, q.Admission)
    rejected = admit(quotas, KEY, "m")
    assert isinstance(rejected, q.Rejection) and "concurrent" in rejected.message
    quotas.release(a, 0)
    quotas.release(a, 0)  # releasing twice frees one slot only
    assert isinstance(admit(quotas, KEY, "m"), q.Admission)
    assert isinstance(admit(quotas, KEY, "m"), q.Rejection)


def test_key_overrides_default_and_limits_one_model(clock: Clock) -> None:
    quotas = _quotas(
        default={"requests_per_minute": 100, "concurrent_requests": 5},
        keys={KEY: {"requests_per_minute": 3, "priority": 3, "models": {"big": {"concurrent_requests": 1}}}},
    )
    first = admit(quotas, KEY, "big")
    assert isinstance(first, q.Admission) and first.priority == 3
    # Refused on `big`'s own limit; a request all the same, counted on the key's rate as it came.
    assert "on `big`" in quotas_rejection(admit(quotas, KEY, "big"))
    assert isinstance(admit(quotas, KEY, "small"), q.Admission)  # the model limit is for `big` only
    assert "Request rate" in quotas_rejection(admit(quotas, KEY, "small"))  # the key's 3/min is spent
    # An unlisted key gets the default (5 concurrent).
    other = hash_key("gamma")
    assert all(isinstance(admit(quotas, other, "big"), q.Admission) for _ in range(5))
    assert "concurrent" in quotas_rejection(admit(quotas, other, "big"))


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


def test_a_request_is_charged_a_request_for_each_sequence(clock: Clock) -> None:
    quotas = _quotas(default={"requests_per_minute": 8})
    assert isinstance(admit(quotas, KEY, "m", sequences=8), q.Admission)  # 4 prompts x n=2, say
    assert "Request rate" in quotas_rejection(admit(quotas, KEY, "m"))
    clock.now += 60
    assert "asks for 9 sequences" in quotas_rejection(admit(quotas, KEY, "m", sequences=9))


def test_a_key_holds_its_slot_from_admission_before_the_model_is_known(clock: Clock) -> None:
    quotas = _quotas(default={"concurrent_requests": 1})
    waiting_for_body = quotas.admit(KEY)
    assert isinstance(waiting_for_body, q.Admission)
    assert "concurrent" in quotas_rejection(quotas.admit(KEY))
    quotas.release(waiting_for_body, 0)
    assert isinstance(quotas.admit(KEY), q.Admission)
