"""Cache-aware routing on Ray: behind two ingress replicas, every turn of a conversation (prefix
routing) and every request of a session (session routing) reaches the replica that holds its
beginning in the prefix cache. The fake engine keeps a prefix cache as vLLM does and says in its
usage how much of each prompt it found there; with load-only routing over three replicas a later
turn would find its conversation on another replica two times in three. The keys and the
ranking are tested without Ray in tests/unit/test_routing.py."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from serve_app.tools.load import CHAT, Call, Result, send_one
from tests.cluster.conftest import deploy

pytestmark = pytest.mark.usefixtures("gpu_cluster")

BLOCK = 4  # words per prefix-cache block of the fake engine


def routed_model(model_id: str, routing: str, replicas: int) -> dict[str, Any]:
    return {
        "id": model_id,
        "source": "none",
        "engine": "fake",
        "num_gpus": 0,
        "num_cpus": 0.1,
        "routing": routing,
        "engine_args": {
            "ttft_s": 0.01,
            "tokens_per_s": 500,
            "prefix_block_words": BLOCK,
            "enable_prompt_tokens_details": True,
        },
        "deployment": {"num_replicas": replicas},
    }


def chat(url: str, model: str, messages: list[dict[str, str]], **extra: Any) -> Result:
    headers = tuple(extra.pop("headers", {}).items())
    body = {"model": model, "messages": messages, "max_tokens": 4, **extra}
    result = send_one(url, Call(CHAT, body, keep_text=True, headers=headers))
    assert result.complete, result.error
    return result


def talk(url: str, model: str, opening: str, turns: int) -> list[Result]:
    """One conversation: each turn carries the ones before and asks again."""
    rng = random.Random(opening)
    messages = [{"role": "system", "content": "be brief " * 8}, {"role": "user", "content": opening}]
    results = []
    for _ in range(turns):
        results.append(chat(url, model, messages))
        question = " ".join(rng.choices(["why", "how", "when", "where", "who"], k=6))
        messages = [
            *messages,
            {"role": "assistant", "content": results[-1].text},
            {"role": "user", "content": question},
        ]
    return results


def test_every_turn_and_every_session_request_finds_its_replicas_cache(url: str) -> None:
    deploy(
        [routed_model("by-prefix", "prefix", 3), routed_model("by-session", "session", 2)],
        ingress={"num_replicas": 2},
    )
    openings = [f"conversation {i} opens with its own words " * 2 for i in range(12)]
    # One at a time: the load guard moves a turn off its replica only at 2 requests (its least
    # slack) over another, and the routers judge by queue lengths they cached up to seconds
    # before (Serve's); two conversations at a time once both stood on one replica in that
    # cache, and a turn went to the next replica of its key.
    conversations = [talk(url, "by-prefix", opening, 4) for opening in openings]
    for turns in conversations:
        # From the second turn on (the first went to the less loaded of the key's first two).
        for before, after in itertools.pairwise(turns[1:]):
            # The turn before's prompt, but for its last (partial) block, was in the cache.
            assert before.prompt_tokens is not None and after.cached_tokens is not None
            assert after.cached_tokens >= before.prompt_tokens - 2 * BLOCK, (before, after)

    # Session routing: by the X-Session-Id header, else the `user` field. A session's second
    # request finds its first's prompt (on another replica it would find nothing).
    sessions: list[dict[str, Any]] = [{"headers": {"X-Session-Id": f"s-{i}"}} for i in range(6)]
    sessions += [{"user": f"user-{i}"} for i in range(4)]
    for index, session in enumerate(sessions):
        prompt = [{"role": "user", "content": f"session {index} asks a question of many words " * 3}]
        first, *later = [chat(url, "by-session", prompt, **session) for _ in range(3)]
        assert first.prompt_tokens is not None
        assert all((r.cached_tokens or 0) >= first.prompt_tokens - BLOCK for r in later), (session, later)
