"""Cache-aware routing: which replica of a model takes a request (a model's `routing`).

- `load`: Serve's own router, by load alone (power of two choices on queue length).
- `prefix`: requests whose conversation begins alike go to one replica, whose vLLM prefix cache
  then holds that beginning. The key is the chat's messages up to and including its first user
  message (each later turn of the conversation repeats them), or a completion prompt's first
  PREFIX_CHARS characters (PREFIX_TOKENS token ids). A chat's opening turn (nothing after its
  first user message) has nothing of its own in any cache yet: it goes to the less loaded of
  the key's first two replicas, so independent one-turn requests spread as by load alone, and
  the turns after it go to the key's first.
- `session`: requests of one session go to one replica: the `X-Session-Id` header, else the
  OpenAI `user` field. A request with neither is routed by load.

The ingress computes the key from the request it parsed and hands it to the model's handle as
the `affinity` keyword; `AffinityRouter`, the model's Serve request router in the ingress, reads
it there. Only a short hash of the key travels.

A key picks its replica by rendezvous (highest-random-weight) hashing over the replicas' ids:
every ingress replica ranks the same replicas the same way for one key, with no state shared
between them, so affinity does not depend on which ingress replica took the request; and when
autoscaling adds or removes a replica, only the keys that it ranks first move.

A request for a LoRA adapter (Serve's multiplexed model id, serve_app.serving.adapters) goes to
a replica that holds the adapter, as Serve reports them: the first of them in the adapter's
rendezvous ranking. Where none holds it, it goes to the replica holding the fewest adapters
(the first in the ranking among equals), which then loads it. What a replica holds reaches the routers a moment after it
loads; meanwhile the router counts the adapters it has just sent to a replica as held there, so
that a burst of requests for adapters no replica holds yet spreads them over the replicas
rather than piling them on the one that looked emptiest (measured on one H200: one replica of
two took 71% of uniform traffic over 8 adapters, holding 6 with room for 4). Its load guard is wider than a
prefix's: a holder keeps its adapters' requests while its queue is less than a quarter of its
`max_ongoing_requests` over the least loaded replica's. A request sent past a holder costs a
load there and, on a full replica, the eviction of another adapter, whose next request then
misses in turn; a few more requests in an engine's batch cost little. Measured on the CPU
(docs/benchmarks.md): with the prefix guard, random traffic over 8 adapters at 8 streams found
its adapter held 69% of the time with room for all 8; past it, the busy adapter is held twice.

The load guard bounds the imbalance, as SGLang's cache-aware router does: a replica keeps its
keys while its queue is less than a slack over the least loaded replica's queue, the slack being
a quarter of the mean queue, at least 2. Past that, the next replica in the key's ranking takes
the request (consistent hashing with bounded loads, Mirrokni et al. 2018), so a hot key's
overflow gathers on one second replica, whose cache then holds it too. Engines batch their
requests: a few more on one replica cost little, where a lost prefix costs its whole prefill.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any, NamedTuple

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

ROUTINGS: tuple[str, ...] = ("load", "prefix", "session")

AFFINITY_KWARG = "affinity"  # the handle call's keyword that carries the key
SESSION_HEADER = "x-session-id"
PREFIX_CHARS = 256  # of a completion prompt: short enough to be in its first turn
PREFIX_TOKENS = 64  # the same for a prompt of token ids
SLACK_SHARE = 0.25  # of the mean queue: how far over the least loaded a replica keeps its keys
MIN_SLACK = 2  # (at least this many requests)
ADAPTER_SLACK_SHARE = 0.25  # of a replica's max_ongoing_requests: the same for an adapter's holder
PLACED_FOR_S = 5.0  # how long a router counts an adapter it sent to a replica as held there
ROUTER_CLASS = f"{__name__}.AffinityRouter"


class Affinity(NamedTuple):
    """What routes one request: its key's hash, and whether it opens a conversation.

    A tuple, read as one by the router: Serve may pickle the router's class by value, and then
    its `Affinity` is not this class."""

    key: str
    opening: bool = False


def _digest(material: bytes) -> str:
    return hashlib.blake2b(material, digest_size=8).hexdigest()


def _first_user(messages: list[Any]) -> int:
    """The index of the first user message (the last message if there is none)."""
    for index, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return index
    return len(messages) - 1


def _prompt_head(prompt: Any) -> Any:
    """The head of a completion prompt (a string, token ids, or a list of either)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of prompts: routed by its first
    if isinstance(prompt, str):
        return prompt[:PREFIX_CHARS]
    if isinstance(prompt, list):
        return prompt[:PREFIX_TOKENS]
    return None


def _key_of(head: Any) -> str:
    text = json.dumps(head, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return _digest(text.encode("utf-8", "surrogatepass"))


def prefix_affinity(payload: Mapping[str, Any]) -> Affinity | None:
    """The `prefix` affinity of a parsed request body, or None if it has no messages or prompt."""
    messages = payload.get("messages")
    if isinstance(messages, list) and messages:
        first = _first_user(messages)
        return Affinity(_key_of(messages[: first + 1]), opening=first == len(messages) - 1)
    head = _prompt_head(payload.get("prompt"))
    return Affinity(_key_of(head)) if head else None


def session_affinity(payload: Mapping[str, Any], headers: Mapping[str, str]) -> Affinity | None:
    """The `session` affinity: the X-Session-Id header, else the `user` field; None without either."""
    session = headers.get(SESSION_HEADER) or payload.get("user")
    if not isinstance(session, str) or not session:
        return None
    return Affinity(_digest(session.encode("utf-8", "surrogatepass")))


def affinity_of(routing: str, payload: Mapping[str, Any], headers: Mapping[str, str]) -> Affinity | None:
    """What routes this request under `routing`; None to route it by load alone."""
    if routing == "prefix":
        return prefix_affinity(payload)
    if routing == "session":
        return session_affinity(payload, headers)
    return None


def rank(key: str, replica_ids: Sequence[str]) -> list[int]:
    """Indices of `replica_ids`, most preferred first, for `key` (rendezvous hashing)."""
    encoded = key.encode()
    scores = [hashlib.blake2b(encoded + rid.encode(), digest_size=8).digest() for rid in replica_ids]
    return sorted(range(len(replica_ids)), key=scores.__getitem__, reverse=True)


def bounded_choice(
    order: Sequence[int], loads: Sequence[int | None], share: float = SLACK_SHARE, least: int = MIN_SLACK
) -> int:
    """The first replica of `order` whose queue is less than the slack over the least loaded
    replica's; `loads[i]` is replica i's queue, None if unknown (taken as free). The slack is
    `share` of the mean queue, at least `least` requests."""
    counted = [load or 0 for load in loads]
    return within_slack(order, counted, max(least, math.ceil(share * sum(counted) / len(counted))))


def within_slack(order: Sequence[int], loads: Sequence[int | None], slack: int) -> int:
    """The first replica of `order` whose queue is less than `slack` over the least loaded's."""
    counted = [load or 0 for load in loads]
    bound = min(counted) + slack
    for index in order:
        if counted[index] < bound:
            return index
    return order[0]  # unreachable: the least loaded is under the bound


class AffinityRouter(RequestRouter):  # type: ignore[misc]
    """Serve's request router of a model with `prefix` or `session` routing (set on the model's
    deployment as its `request_router_config`; it runs in each ingress replica's handle).

    A request with an affinity goes to the replica its key ranks first, unless the load guard
    passes it on (see the module); an opening turn to the less loaded of the key's first two;
    one without an affinity to the less loaded of two random replicas, as Serve's default
    router does. If the chosen replica turns out full, the least loaded of the others takes it.
    Each request is routed on its own (no FIFO hand-over to an older request, which would give
    one request's replica to another)."""

    def initialize_state(self, slack_share: float = SLACK_SHARE, min_slack: int = MIN_SLACK) -> None:
        self._slack = (slack_share, min_slack)
        self._placed: dict[str, tuple[str, float]] = {}  # adapter -> (replica id, when) sent lately

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        adapter = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if adapter and len(candidate_replicas) > 1:
            return self._to_holders(candidate_replicas, adapter)
        affinity = pending_request.kwargs.get(AFFINITY_KWARG) if pending_request is not None else None
        if not isinstance(affinity, tuple) or len(candidate_replicas) == 1:
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        key, opening = affinity
        order = rank(key, [r.replica_id.unique_id for r in candidate_replicas])
        if opening:
            # The less loaded of the two (Serve picks the lower queue; a tie goes to the first).
            return [[candidate_replicas[i] for i in order[:2]], [candidate_replicas[i] for i in order[2:]]]
        cache = self._replica_queue_len_cache
        loads = [cache.get(r.replica_id) for r in candidate_replicas]
        chosen = bounded_choice(order, loads, *self._slack)
        rest = [candidate_replicas[i] for i in order if i != chosen]
        return [[candidate_replicas[chosen]], rest]

    def _to_holders(self, candidates: list[RunningReplica], adapter: str) -> list[list[RunningReplica]]:
        ids = [r.replica_id.unique_id for r in candidates]
        now = time.monotonic()
        held = self._held(candidates, ids, now)
        order = adapter_order(adapter, ids, held)
        cache = self._replica_queue_len_cache
        capacity = min(r.max_ongoing_requests for r in candidates)
        slack = max(MIN_SLACK, math.ceil(ADAPTER_SLACK_SHARE * capacity))
        chosen = within_slack(order, [cache.get(r.replica_id) for r in candidates], slack)
        if adapter not in held[chosen]:
            self._placed[adapter] = (ids[chosen], now)
        return [[candidates[chosen]], [candidates[i] for i in order if i != chosen]]

    def _held(self, candidates: list[RunningReplica], ids: list[str], now: float) -> list[set[str]]:
        """What each replica holds: as Serve reports it, and the adapters this router sent there
        in the last PLACED_FOR_S (their reports may not have come yet)."""
        held = [set(r.multiplexed_model_ids) for r in candidates]
        where = {rid: n for n, rid in enumerate(ids)}
        for adapter, (rid, when) in list(self._placed.items()):
            if now - when > PLACED_FOR_S:
                del self._placed[adapter]
            elif rid in where:
                held[where[rid]].add(adapter)
        return held


def adapter_order(adapter: str, replica_ids: Sequence[str], held: Sequence[Collection[str]]) -> list[int]:
    """Indices of the replicas in the order an adapter's request tries them: those holding it,
    then those holding the fewest adapters; the adapter's rendezvous ranking among equals."""
    place = {index: n for n, index in enumerate(rank(adapter, replica_ids))}
    return sorted(
        range(len(replica_ids)),
        key=lambda i: (adapter not in held[i], 0 if adapter in held[i] else len(held[i]), place[i]),
    )


def router_config(routing: str, adapters: bool = False) -> dict[str, Any] | None:
    """The deployment's `request_router_config` for `routing` (and a model serving LoRA
    adapters); None keeps Serve's default."""
    if routing == "load" and not adapters:
        return None
    return {"request_router_class": ROUTER_CLASS}
