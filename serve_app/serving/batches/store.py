"""Where batches and their files are kept: a directory, or an object store through fsspec.

Every object is written whole and never appended to, so a local directory and an object store
behave alike: a local write goes to a temporary name first and is renamed into place (a reader
never sees half a file, and a crash leaves none), an object store's put is whole by itself.

    files/<file id>/meta.json     the file object (owner included)
    files/<file id>/data          its bytes
    batches/<batch id>/meta.json  the batch object (owner and progress included)
    batches/<batch id>/parts/*    its answered lines, a part per flush, each written once
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


class BatchStore:
    """Whole-object reads and writes under one root."""

    def __init__(self, uri: str) -> None:
        uri = os.path.expanduser(uri)
        self.fs, self.root = fsspec.core.url_to_fs(uri)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.fs.makedirs(self.root, exist_ok=True)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def put(self, key: str, data: bytes) -> None:
        path = self.path(key)
        if not self.local:
            self.fs.pipe_file(path, data)
            return
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def get(self, key: str) -> bytes:
        """The object's bytes; FileNotFoundError if there is none."""
        return bytes(self.fs.cat_file(self.path(key)))

    def put_json(self, key: str, value: Any) -> None:
        self.put(key, json.dumps(value, ensure_ascii=False).encode())

    def get_json(self, key: str) -> Any:
        return json.loads(self.get(key))

    def children(self, key: str) -> list[str]:
        """The names directly under `key` (temporary files left by a crash excluded), sorted."""
        try:
            entries = self.fs.ls(self.path(key), detail=False)
        except FileNotFoundError:
            return []
        names = (str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)
        return sorted(n for n in names if not n.endswith(".tmp"))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self.path(key), recursive=True)
