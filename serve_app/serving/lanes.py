"""Interactive requests first, on one model replica: a batch request (serve_app.serving.batches)
enters the engine only while no interactive request here waits for its first answer.

An interactive request counts from when the replica takes it until the engine's first item (a
stream's first token, a whole response's end); batch requests that arrive meanwhile wait, then
enter together. Batch requests already in the engine keep running (at low priority where the
engine schedules by priority). Batches thus take what interactive traffic leaves: between its
requests' starts under light load, little under steady heavy load.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator


class Lanes:
    """One replica's count of interactive requests not yet answered at all."""

    def __init__(self) -> None:
        self._starting = 0
        self._clear = asyncio.Event()
        self._clear.set()

    @property
    def starting(self) -> int:
        return self._starting

    @contextlib.contextmanager
    def interactive(self) -> Iterator[Callable[[], None]]:
        """Count an interactive request until it calls what this gives (at its first item from
        the engine) or the block ends, whichever comes first."""
        self._starting += 1
        self._clear.clear()
        counted = True

        def started() -> None:
            nonlocal counted
            if counted:
                counted = False
                self._starting -= 1
                if self._starting == 0:
                    self._clear.set()

        try:
            yield started
        finally:
            started()

    async def batch_turn(self) -> None:
        """Return when no interactive request is waiting for its first item."""
        await self._clear.wait()
