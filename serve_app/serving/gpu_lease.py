"""GPU leases: which replicas of a `gpu_group`'s models are awake on each GPU.

Replicas of models that share a GPU (num_gpus below 1, so Ray places several on one GPU) each
need their `gpu_memory_share` of its memory while awake; asleep, they hold almost none. A
replica holds a lease on its GPU while awake. To wake (or start) it asks for its share; where
the GPU lacks room, the least recently used awake replicas are asked to sleep, and the waker
waits until they have. So at most as many are awake on a GPU as fit.

`LeaseBook` is the bookkeeping of one GPU. `GpuLeases` is the Serve deployment (one replica per
application) that keeps the books of every GPU; replicas reach it through `ServeLease`, one
holder's view of its lease. Each replica polls the book (`poll`, a long poll that returns at
once when the replica is asked to sleep): the poll is also its heartbeat, so the share of a
replica that died is freed after LOST_AFTER_S, and each poll says whether the replica is awake,
so a restarted `GpuLeases` learns the books again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

logger = logging.getLogger("ray.serve")

CAPACITY = 1.0  # a GPU's memory, in shares
POLL_S = 2.0  # a poll returns after this with no news: the holder's heartbeat
# A holder that neither polled nor called for this long is gone. Generous: a replica's event loop
# may block for tens of seconds while it imports vLLM and builds its config at start.
LOST_AFTER_S = 60.0
_EPSILON = 1e-9

SETTLE_S = 2 * POLL_S + 1.0  # a new book's wait for the awake replicas' polls (and a retry)
LEASES_NAME = "GpuLeases"  # the deployment's name


@dataclass(frozen=True, slots=True)
class HolderInfo:
    """Who asks: one replica, its model, and its share of the GPU's memory awake."""

    id: str
    model: str
    share: float


@dataclass
class _Holder:
    info: HolderInfo
    awake: bool = False
    acquiring: bool = False  # waiting in `acquire`
    evicting: bool = False  # asked to sleep, not yet asleep
    last_used: float = 0.0  # the holder's last request (wall clock)
    polls: int = 0  # polls waiting now
    seen: float = field(default_factory=time.monotonic)
    granted: float = 0.0  # time.monotonic() of its last grant


class LeaseBook:
    """The awake replicas of one GPU, and who must sleep to make room for whom."""

    def __init__(
        self, capacity: float = CAPACITY, lost_after_s: float = LOST_AFTER_S, settle_s: float = 0.0
    ) -> None:
        """`settle_s`: grant nothing for this long after creation, while the holders awake
        report in (a book that replaces one lost in a restart knows nothing at first)."""
        self.capacity = capacity
        self.lost_after_s = lost_after_s
        self._holders: dict[str, _Holder] = {}
        self._changed = asyncio.Condition()
        self._settled_at = time.monotonic() + settle_s

    def _holder(self, info: HolderInfo) -> _Holder:
        holder = self._holders.get(info.id)
        if holder is None:
            holder = self._holders[info.id] = _Holder(info)
        holder.info, holder.seen = info, time.monotonic()
        return holder

    def awake(self) -> dict[str, str]:
        """Holder id -> model, of the holders awake (or waking) now."""
        return {h.info.id: h.info.model for h in self._holders.values() if h.awake}

    def _free(self) -> float:
        return self.capacity - sum(h.info.share for h in self._holders.values() if h.awake)

    def _drop_lost(self) -> None:
        now = time.monotonic()
        for holder_id, holder in list(self._holders.items()):
            if not holder.polls and not holder.acquiring and now - holder.seen > self.lost_after_s:
                logger.warning(
                    "GPU lease: replica %s of %s is gone; its share is free", holder_id, holder.info.model
                )
                del self._holders[holder_id]

    async def acquire(self, info: HolderInfo) -> list[str]:
        """Wait until `info`'s share is free, asking the least recently used awake holders to
        sleep where it is not; then count it awake. Returns the models asked to sleep for it."""
        if info.share > self.capacity + _EPSILON:
            raise ValueError(f"{info.model} needs {info.share:g} of a GPU that has {self.capacity:g}")
        holder = self._holder(info)
        # Whoever asks is asleep, whatever a poll said before (it reports a wake as awake).
        holder.awake = holder.evicting = False
        holder.acquiring = True
        evicted: list[str] = []
        try:
            async with self._changed:
                while True:
                    if self._holders.get(info.id) is not holder:
                        raise RuntimeError(f"replica {info.id} left while it asked for room")
                    holder.seen = time.monotonic()
                    self._drop_lost()
                    settling = self._settled_at - time.monotonic()
                    if settling <= 0 and info.share <= self._free() + _EPSILON:
                        holder.awake, holder.evicting = True, False
                        holder.last_used, holder.granted = time.time(), time.monotonic()
                        self._changed.notify_all()
                        break
                    if settling <= 0:
                        evicted += self._evict_for(holder)
                    # Then look again: a holder may be lost, or the book settled.
                    wait_s = min(POLL_S, settling) if settling > 0 else POLL_S
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), timeout=wait_s)
        finally:
            holder.acquiring = False
        return evicted

    def _evict_for(self, holder: _Holder) -> list[str]:
        """Ask the least recently used awake holders to sleep until `holder` would fit once they
        have (those already asked count as leaving)."""
        leaving = sum(h.info.share for h in self._holders.values() if h.awake and h.evicting)
        need = holder.info.share - self._free() - leaving
        victims = sorted(
            (h for h in self._holders.values() if h.awake and not h.evicting and h is not holder),
            key=lambda h: h.last_used,
        )
        evicted = []
        for victim in victims:
            if need <= _EPSILON:
                break
            victim.evicting = True
            need -= victim.info.share
            evicted.append(victim.info.model)
            logger.info(
                "GPU lease: %s (replica %s) sleeps to make room for %s",
                victim.info.model,
                victim.info.id,
                holder.info.model,
            )
        if evicted:
            self._changed.notify_all()
        return evicted

    async def release(self, info: HolderInfo) -> None:
        """`info`'s replica sleeps: its share is free."""
        async with self._changed:
            holder = self._holder(info)
            holder.awake = holder.evicting = False
            self._changed.notify_all()

    async def leave(self, holder_id: str) -> None:
        """The replica stops: forget it."""
        async with self._changed:
            self._holders.pop(holder_id, None)
            self._changed.notify_all()

    async def poll(self, info: HolderInfo, awake: bool, last_used: float, wait_s: float = POLL_S) -> bool:
        """Whether the holder must sleep now; waits up to `wait_s` for that. `awake`
        and `last_used` are the holder's own view, which the book takes (it may have restarted)."""
        async with self._changed:
            holder = self._holder(info)
            holder.last_used = max(holder.last_used, last_used)
            if not holder.acquiring and awake and not holder.awake:
                # Awake where the book did not know it (the book restarted, or took it for
                # lost): count it, and where the GPU has no room for it, it must sleep.
                if self._free() < holder.info.share - _EPSILON:
                    logger.warning(
                        "GPU lease: %s (replica %s) is awake beyond the GPU's room", info.model, info.id
                    )
                    holder.evicting = True
                holder.awake = True
            elif (
                not holder.acquiring
                and not awake
                and holder.awake
                and time.monotonic() - holder.granted > 2 * POLL_S
            ):
                # Asleep where the book counts it awake (a grant its holder gave up on): free the
                # share (a grant newer than this poll could know of stays).
                holder.awake = holder.evicting = False
                self._changed.notify_all()
            holder.polls += 1
            try:
                with contextlib.suppress(TimeoutError):  # asleep, it waits as long: a heartbeat
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: holder.awake and holder.evicting), timeout=wait_s
                    )
            finally:
                holder.polls -= 1
                holder.seen = time.monotonic()
            return holder.awake and holder.evicting


class Lease(Protocol):
    """One replica's lease on its GPU (what `serve_app.serving.warm.WarmTier` needs)."""

    async def acquire(self) -> None: ...

    async def release(self) -> None: ...

    async def must_sleep(self, awake: bool, last_used: float) -> bool: ...

    async def leave(self) -> None: ...


class BookLease:
    """A lease kept in a `LeaseBook` in this process (tests, and the book's own use)."""

    def __init__(self, book: LeaseBook, info: HolderInfo) -> None:
        self.book = book
        self.info = info

    async def acquire(self) -> None:
        await self.book.acquire(self.info)

    async def release(self) -> None:
        await self.book.release(self.info)

    async def must_sleep(self, awake: bool, last_used: float) -> bool:
        return await self.book.poll(self.info, awake, last_used)

    async def leave(self) -> None:
        await self.book.leave(self.info.id)


class GpuLeases:
    """The Serve deployment that keeps the lease books of every shared GPU of the application,
    one book per GPU key (`gpu_key`)."""

    def __init__(self) -> None:
        self._books: dict[str, LeaseBook] = {}

    def _book(self, key: str) -> LeaseBook:
        if key not in self._books:
            # A new book may replace one lost in a restart: the replicas awake report in first.
            self._books[key] = LeaseBook(settle_s=SETTLE_S)
        return self._books[key]

    async def acquire(self, key: str, info: HolderInfo) -> list[str]:
        return await self._book(key).acquire(info)

    async def release(self, key: str, info: HolderInfo) -> None:
        await self._book(key).release(info)

    async def poll(self, key: str, info: HolderInfo, awake: bool, last_used: float) -> bool:
        return await self._book(key).poll(info, awake, last_used)

    async def leave(self, key: str, holder_id: str) -> None:
        await self._book(key).leave(holder_id)

    async def awake(self) -> dict[str, dict[str, str]]:
        """Per GPU key: the replicas awake there and their models (for operators and tests)."""
        return {key: book.awake() for key, book in self._books.items()}


class ServeLease:
    """One replica's lease, kept by the `GpuLeases` deployment behind `handle`."""

    def __init__(self, handle: Any, key: str, info: HolderInfo) -> None:
        self._handle = handle
        self.key = key
        self.info = info

    async def acquire(self) -> None:
        response = self._handle.acquire.remote(self.key, self.info)
        try:
            await response
        except asyncio.CancelledError:
            response.cancel()  # Serve does not cancel a call its caller gave up on
            raise

    async def release(self) -> None:
        await self._handle.release.remote(self.key, self.info)

    async def must_sleep(self, awake: bool, last_used: float) -> bool:
        return bool(await self._handle.poll.remote(self.key, self.info, awake, last_used))

    async def leave(self) -> None:
        await self._handle.leave.remote(self.key, self.info.id)


def gpu_key() -> str:
    """The lease book of this process's GPU: the node, and the GPU Ray gave the replica (on a
    machine without GPUs, one logical GPU per node). Not the group: models of two groups that
    Ray places on one GPU share its memory all the same."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    gpus = ",".join(str(g) for g in ray.get_gpu_ids()) or "logical"
    return f"{node}/{gpus}"
