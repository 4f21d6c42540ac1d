"""Interactive requests first: batch requests (serve_app.serving.batches) take only what
interactive traffic leaves.

An interactive request counts in its lane from its arrival until its first token (a stream's
first chunk, a whole answer's end), or until its end (`batches.yield_until: end`). While any
counts, no batch request of the lane starts, and, at the ingress, those in flight are
preempted (`batches.preempt`: all those of the lane, or only those of the arrival's own model,
which share its engine's steps): cancelled in the engine, and sent again once the lane has been
quiet for `batches.settle_s` (a request preempted `MAX_PREEMPTIONS` times runs on, so that a
long one cannot starve).

A lane is a model (`batches.yield_to: model`: its interactive requests hold back its batch
requests only), or the whole app (`app`: models that share hardware, e.g. CPU cores). The
ingress holds a lane per model or one for all; each model replica holds one for itself, for
the interactive requests that other ingress replicas send it (to their first token).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Literal, TypeVar

T = TypeVar("T")
Preempt = bool | Literal["model"]  # every batch request of the lane, none, those of the arrival's model

MAX_PREEMPTIONS = 3


class Hold:
    """An interactive request counted in its lane until `release()` (once)."""

    def __init__(self, lane: Lane) -> None:
        self._lane: Lane | None = lane

    def release(self) -> None:
        if self._lane is not None:
            lane, self._lane = self._lane, None
            lane.released()


class Lane:
    """The interactive requests of one lane not yet started, and its batch requests in flight."""

    def __init__(self, settle_s: float = 0.0, preempt: Preempt = True) -> None:
        """`settle_s`: how long the lane must have been quiet before a batch request starts (a
        request started in a short gap is preempted by the next arrival: work lost, and the
        cancellation's own cost falls on that arrival). `preempt`: which batch requests in
        flight an arrival cancels: all (True), none (False), those of its model ("model")."""
        self.starting = 0
        self._settle_s = settle_s
        self._preempt = preempt
        self._quiet = asyncio.Event()
        self._quiet.set()
        self._quiet_since = 0.0
        # in flight -> (its model, times preempted before)
        self._batch: dict[asyncio.Task[object], tuple[str | None, int]] = {}

    def hold(self, model: str | None = None) -> Hold:
        """Count an interactive request (to `model`), and preempt the batch requests that may be."""
        self.starting += 1
        self._quiet.clear()
        for task, (of, preempted) in self._batch.items():
            if preempted < MAX_PREEMPTIONS and self._preempts(of, model):
                task.cancel()
        return Hold(self)

    def _preempts(self, batch_model: str | None, arrival_model: str | None) -> bool:
        if self._preempt == "model":
            return batch_model == arrival_model
        return bool(self._preempt)

    def released(self) -> None:
        self.starting -= 1
        if self.starting == 0:
            self._quiet_since = time.monotonic()
            self._quiet.set()

    async def quiet(self) -> None:
        """Return when no interactive request of this lane has been waiting for `settle_s`."""
        while True:
            await self._quiet.wait()
            left = self._quiet_since + self._settle_s - time.monotonic()
            if left <= 0:
                return
            await asyncio.sleep(left)

    async def run_batch(self, attempt: Callable[[int], Awaitable[T]], model: str | None = None) -> T:
        """`attempt(n)` (n: the times it was preempted before) of a request to `model` once the
        lane is quiet, again after each preemption."""
        preempted = 0
        while True:
            await self.quiet()
            task = asyncio.ensure_future(attempt(preempted))
            self._batch[task] = (model, preempted)
            try:
                await asyncio.wait({task})
            except asyncio.CancelledError:  # the caller's: the attempt goes with it
                task.cancel()
                raise
            finally:
                self._batch.pop(task, None)
            if not task.cancelled():
                return task.result()
            preempted += 1


class Lanes:
    """The lanes of an ingress replica or of a model replica: one per model, or one for all."""

    def __init__(self, per_model: bool = True, settle_s: float = 0.0, preempt: Preempt = True) -> None:
        self._per_model = per_model
        self._settle_s = settle_s
        self._preempt = preempt
        self._lanes: dict[str, Lane] = {}

    def lane(self, model: str) -> Lane:
        key = model if self._per_model else ""
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = Lane(self._settle_s, self._preempt)
        return lane
