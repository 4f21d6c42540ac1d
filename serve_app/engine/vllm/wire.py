"""How a model replica and its frontend processes talk (serve_app.engine.vllm.frontends).

Each frontend listens on a Unix socket in a directory only the replica's user can open. One
connection carries one call: the replica writes a request frame, the frontend answers with
frames until an end frame. A request is streamed back item by item (`Head`, SSE bytes,
`Usage`); the replica closing the connection cancels the request, as a client that leaves.

A frame is a 4-byte big-endian length, a kind byte and the payload: SSE bytes travel as they
are (most frames), anything else pickled. Both ends are processes of one replica, started by
it from the same installation: pickle is safe here, never across hosts.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from dataclasses import dataclass
from typing import Any

_HEADER = struct.Struct(">IB")
_RAW, _PICKLED, _END, _ERROR = 0, 1, 2, 3
MAX_FRAME = 256 * 2**20  # far above any request or chunk; a larger length is a broken stream


class FrontendError(RuntimeError):
    """A call failed in a frontend process; the message says why."""


@dataclass(frozen=True, slots=True)
class Call:
    """One call to a frontend: an operation and its arguments."""

    op: str  # "handle", "load", "alive", "probe", "info"
    args: tuple[Any, ...] = ()


def _frame(kind: int, payload: bytes) -> bytes:
    return _HEADER.pack(len(payload), kind) + payload


def item_frame(item: Any) -> bytes:
    """One streamed item (or a call, or a call's result)."""
    if isinstance(item, bytes):
        return _frame(_RAW, item)
    return _frame(_PICKLED, pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))


def end_frame() -> bytes:
    return _frame(_END, b"")


def error_frame(message: str) -> bytes:
    return _frame(_ERROR, message.encode())


class End(Exception):
    """The other end finished its answer."""


async def read_item(reader: asyncio.StreamReader) -> Any:
    """The next item; raises End after the last one, FrontendError for a failed call, and
    asyncio.IncompleteReadError if the other process went away."""
    size, kind = _HEADER.unpack(await reader.readexactly(_HEADER.size))
    if size > MAX_FRAME:
        raise FrontendError(f"a frame of {size} bytes: the stream is broken")
    payload = await reader.readexactly(size) if size else b""
    if kind == _RAW:
        return payload
    if kind == _PICKLED:
        return pickle.loads(payload)
    if kind == _END:
        raise End
    raise FrontendError(payload.decode(errors="replace"))
