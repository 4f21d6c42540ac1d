"""The fake engine's scheduler: `max_num_seqs` slots, handed to waiting requests first come first
served, or by `priority` as vLLM's `scheduling_policy: priority` does. (Its OpenAI answers are
held to vLLM's by tests/contract.)"""

from __future__ import annotations

import asyncio

import pytest

from serve_app.engine.fake import Slots


async def _order(by_priority: bool, cancel: str | None = None) -> list[str]:
    slots = Slots(1, by_priority)
    await slots.acquire(0)  # the one slot is taken: everyone below waits
    served: list[str] = []

    async def request(name: str, priority: int) -> None:
        await slots.acquire(priority)
        served.append(name)
        slots.release()

    waiting = {
        name: asyncio.ensure_future(request(name, priority))
        for name, priority in (("first", 5), ("urgent", -1), ("third", 5))
    }
    await asyncio.sleep(0)  # all three wait
    if cancel is not None:
        waiting[cancel].cancel()
    slots.release()
    await asyncio.gather(*waiting.values(), return_exceptions=True)
    return served


@pytest.mark.parametrize(
    ("by_priority", "cancel", "order"),
    [
        (False, None, ["first", "urgent", "third"]),
        (True, None, ["urgent", "first", "third"]),
        (True, "urgent", ["first", "third"]),  # a request that left while waiting is skipped
    ],
)
def test_waiting_requests_get_slots_in_the_policys_order(
    by_priority: bool, cancel: str | None, order: list[str]
) -> None:
    assert asyncio.run(_order(by_priority, cancel)) == order
