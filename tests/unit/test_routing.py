"""Cache-aware routing (serve_app/serving/routing.py): the keys, the ranking every ingress
replica computes alike, the load guard, and the router's choice over real Serve replica ids."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
from ray.serve._private.common import DeploymentID, ReplicaID, RequestMetadata
from ray.serve.request_router import PendingRequest

from serve_app.engine.fake import PrefixCache
from serve_app.serving.routing import (
    AFFINITY_KWARG,
    PREFIX_CHARS,
    Affinity,
    AffinityRouter,
    affinity_of,
    bounded_choice,
    prefix_affinity,
    rank,
    router_config,
    session_affinity,
)
from tests.support.routers import affinity_router

SYSTEM = {"role": "system", "content": "You answer in French. " * 20}


def prefix_key(payload: dict[str, Any]) -> str | None:
    affinity = prefix_affinity(payload)
    return None if affinity is None else affinity.key


def session_key(payload: dict[str, Any], headers: dict[str, str]) -> str | None:
    affinity = session_affinity(payload, headers)
    return None if affinity is None else affinity.key


def conversation(first: str, turns: int) -> list[dict[str, str]]:
    """The messages of a chat's turn `turns`: the system prompt, and each turn's question and answer."""
    messages = [SYSTEM, {"role": "user", "content": first}]
    for turn in range(1, turns):
        messages += [
            {"role": "assistant", "content": f"answer {turn}"},
            {"role": "user", "content": f"q{turn}"},
        ]
    return messages


def test_every_turn_of_a_conversation_has_its_first_turns_key() -> None:
    keys = {prefix_key({"messages": conversation("Where is Lyon?", turns)}) for turns in (1, 2, 5)}
    assert len(keys) == 1 and None not in keys
    # Only the first turn opens the conversation: nothing of it is in a cache yet.
    opening = [prefix_affinity({"messages": conversation("Where is Lyon?", turns)}) for turns in (1, 2, 5)]
    assert [a.opening for a in opening if a is not None] == [True, False, False]
    # Another conversation with the same system prompt has a key of its own.
    assert prefix_key({"messages": conversation("Where is Nice?", 1)}) not in keys
    # The first user message counts whole, with its images' addresses.
    parts = [
        {"type": "text", "text": "this"},
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.png"}},
    ]
    other = [
        {"type": "text", "text": "this"},
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/b.png"}},
    ]
    assert prefix_key({"messages": [{"role": "user", "content": parts}]}) != prefix_key(
        {"messages": [{"role": "user", "content": other}]}
    )


def test_a_completion_prompt_is_keyed_by_its_head() -> None:
    head = "x" * PREFIX_CHARS
    assert prefix_key({"prompt": head + "first turn"}) == prefix_key({"prompt": head + "second turn, longer"})
    assert prefix_key({"prompt": "y" + head}) != prefix_key({"prompt": head})
    ids = list(range(100))
    assert (
        prefix_key({"prompt": ids}) == prefix_key({"prompt": [*ids, 7, 8]}) == prefix_key({"prompt": [ids]})
    )
    assert prefix_key({"prompt": [5, *ids]}) != prefix_key({"prompt": ids})
    for empty in ({}, {"prompt": ""}, {"messages": []}, {"prompt": 3}):
        assert prefix_key(empty) is None


def test_session_key_comes_from_the_header_then_the_user_field() -> None:
    header = session_key({"user": "alice"}, {"x-session-id": "s-1"})
    assert header == session_key({}, {"x-session-id": "s-1"}) != session_key({"user": "alice"}, {})
    assert session_key({"user": "alice"}, {}) == session_key({"user": "alice", "messages": []}, {})
    assert session_key({"user": 3}, {}) is None and session_key({}, {}) is None
    assert affinity_of("session", {"user": "alice"}, {}) == Affinity(session_key({"user": "alice"}, {}) or "")
    assert affinity_of("prefix", {"prompt": "p"}, {}) == Affinity(prefix_key({"prompt": "p"}) or "")
    assert affinity_of("load", {"prompt": "p", "user": "alice"}, {"x-session-id": "s"}) is None


def _ids(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.getrandbits(32):08x}" for _ in range(n)]


def test_every_ingress_replica_ranks_the_replicas_alike_in_any_order() -> None:
    replicas = _ids(4)
    for key in (f"{k:016x}" for k in range(200)):
        chosen = replicas[rank(key, replicas)[0]]
        shuffled = random.Random(key).sample(replicas, len(replicas))
        assert [shuffled[i] for i in rank(key, shuffled)] == [replicas[i] for i in rank(key, replicas)]
        assert shuffled[rank(key, shuffled)[0]] == chosen


def test_scaling_moves_only_the_keys_of_the_replica_added_or_removed() -> None:
    keys = [f"{k:016x}" for k in range(3000)]
    three = _ids(3)
    four = [*three, "added"]
    before = {k: three[rank(k, three)[0]] for k in keys}
    after = {k: four[rank(k, four)[0]] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == "added" for k in moved)
    assert 0.2 < len(moved) / len(keys) < 0.3  # about 1/4
    # Removing a replica moves its keys only.
    two = three[1:]
    removed = {k: two[rank(k, two)[0]] for k in keys}
    assert all(removed[k] == before[k] for k in keys if before[k] != three[0])
    # Many keys spread evenly.
    counts = Counter(before.values())
    assert max(counts.values()) / min(counts.values()) < 1.15


def test_the_load_guard_passes_a_request_to_the_keys_next_replica() -> None:
    order = [2, 0, 1]
    assert bounded_choice(order, [None, None, None]) == 2  # nothing known: the key's replica
    assert bounded_choice(order, [0, 0, 0]) == 2
    # Slack max(2, ceil(0.25 * mean)): the key's replica keeps its keys below least + slack.
    assert bounded_choice(order, [0, 0, 1]) == 2
    assert bounded_choice(order, [1, 0, 2]) == 0  # at 0 + 2: the next in the key's order
    assert bounded_choice(order, [2, 0, 2]) == 1  # the first two at it: the third
    # The slack grows with the load: a quarter of the mean queue (6 here, then 8).
    assert bounded_choice(order, [20, 20, 25]) == 2
    assert bounded_choice(order, [20, 20, 26]) == 0
    assert bounded_choice(order, [18, 46, 25]) == 2
    # Unknown loads count as free.
    assert bounded_choice(order, [None, 5, 9]) == 0


@dataclass
class FakeReplica:
    """What AffinityRouter reads of a replica (Serve's RunningReplica has both)."""

    replica_id: ReplicaID
    max_ongoing_requests: int = 8


def _router(n: int) -> tuple[AffinityRouter, list[FakeReplica]]:
    deployment = DeploymentID(name="m", app_name="a")
    router = affinity_router(deployment)
    return router, [FakeReplica(ReplicaID(unique_id=uid, deployment_id=deployment)) for uid in _ids(n)]


def _pending(key: str | None, opening: bool = False) -> PendingRequest:
    metadata = RequestMetadata(request_id="r", internal_request_id="i")
    kwargs = {AFFINITY_KWARG: Affinity(key, opening)} if key is not None else {}
    return PendingRequest(args=[], kwargs=kwargs, metadata=metadata, future=asyncio.Future())


def test_the_router_sends_a_key_to_its_replica_then_the_rest() -> None:
    asyncio.run(_router_choices())


async def _router_choices() -> None:
    router, replicas = _router(3)
    uids = [r.replica_id.unique_id for r in replicas]
    key = prefix_key({"messages": conversation("Where is Lyon?", 1)})
    assert key is not None
    first, *others = rank(key, uids)
    ranks = await router.choose_replicas(replicas, _pending(key))
    assert ranks == [[replicas[first]], [replicas[i] for i in others]]
    # The same key from a router in another ingress replica, which lists the replicas otherwise.
    other, _ = _router(0)
    again = await other.choose_replicas(list(reversed(replicas)), _pending(key))
    assert again[0] == [replicas[first]]
    # Its replica 2 (the least slack) over the others: the key's second replica takes it.
    router.replica_queue_len_cache.update(replicas[first].replica_id, 3)
    for i in others:
        router.replica_queue_len_cache.update(replicas[i].replica_id, 1)
    ranks = await router.choose_replicas(replicas, _pending(key))
    assert ranks[0] == [replicas[others[0]]] and replicas[first] in ranks[1]
    # An opening turn: the key's first two, for the less loaded to take it.
    ranks = await router.choose_replicas(replicas, _pending(key, opening=True))
    assert ranks == [[replicas[first], replicas[others[0]]], [replicas[others[1]]]]
    # No key: two replicas, for the less loaded to take it.
    (pair,) = await router.choose_replicas(replicas, _pending(None))
    assert len(pair) == 2 and set(map(id, pair)) <= set(map(id, replicas))


def test_only_affinity_routing_replaces_serves_router() -> None:
    assert router_config("load") is None
    config = router_config("prefix")
    assert config is not None and config == router_config("session")
    from ray._common.utils import import_attr

    assert import_attr(config["request_router_class"]) is AffinityRouter


@pytest.mark.parametrize(("capacity", "found"), [(64, 8), (1, 0)])
def test_the_fake_engines_prefix_cache_finds_common_beginnings(capacity: int, found: int) -> None:
    cache = PrefixCache(block_words=4, blocks=capacity)
    first = [f"w{i}" for i in range(10)]  # two whole blocks
    assert cache.lookup(first) == 0
    # Its two blocks again, unless the first was evicted (one block held: a chain breaks there).
    assert cache.lookup([*first, "more", "words"]) == found
    assert cache.lookup(["other", *first]) == 0  # a different beginning shares nothing
    assert cache.queries == 10 + 12 + 11 and cache.hits == found
