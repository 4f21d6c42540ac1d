"""Fixes for faults of vLLM releases, applied process-wide by each replica's engine.

Each fault has its own module, which names the releases it targets and was tested on. Each
`Patch` can be applied and reverted; `tests/contract` holds one test per patch that reverts
it and shows the fault is still there in the installed vLLM, so that the test fails (and
says to drop the patch) once a release fixes it upstream.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Patch:
    """One fix of a vLLM fault."""

    name: str
    fault: str  # what goes wrong without it, in a line
    targets: str  # the releases that have the fault
    tested: tuple[str, ...]  # the releases it was tested on
    apply: Callable[[], bool]  # True where the installed release has something to patch
    revert: Callable[[], None]


def all_patches() -> tuple[Patch, ...]:
    from serve_app.engine.vllm.patches import handover_abort, json_coroutines, parser_tables

    return (parser_tables.PATCH, json_coroutines.PATCH, handover_abort.PATCH)


def apply_all() -> list[str]:
    """Apply every patch (again: applying twice is harmless); the names of those that applied."""
    applied = [patch.name for patch in all_patches() if patch.apply()]
    logger.debug("vLLM patches applied: %s", applied)
    return applied


@contextlib.contextmanager
def reverted(patch: Patch) -> Iterator[None]:
    """Run with `patch` taken out (for the tests that show its fault), then put it back."""
    patch.revert()
    try:
        yield
    finally:
        patch.apply()
