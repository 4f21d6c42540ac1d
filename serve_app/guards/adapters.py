"""Checks of a LoRA adapter before any engine acts on it: where its files may come from, and
whether they are a PEFT LoRA that fits the base model.

- A local source must resolve (links and `..` followed) inside one of the model's
  `lora.source_dirs`; a source from the admin route must be local. A Hugging Face repository
  id may come only from the config.
- The directory must hold PEFT's `adapter_config.json` (a LORA) and its weights
  (`adapter_model.safetensors`, `.bin` or `.pt`), as vLLM reads them. Mistral's own format
  (mistral-finetune's `lora.safetensors`) is named as such: vLLM does not read it.
- Its rank must be at most the model's `max_lora_rank`, and every weight's shape must match
  the base model's layers (read from the safetensors header, no tensor loaded): an adapter of
  another model fails here, not in the engine.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve_app.config.model import is_local_source
from serve_app.models.shapes import ModelShapes

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
MISTRAL_LORA_FILE = "lora.safetensors"
MAX_CONFIG_BYTES = 1 << 20
MAX_HEADER_BYTES = 16 << 20
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
# lora_A / lora_B weights, as PEFT names them: ...layers.N.<block>.<module>.lora_A.weight
_WEIGHT = re.compile(r"layers\.(\d+)\.(?:[A-Za-z_]+\.)?([a-z_]+)\.lora_([AB])(?:\.[A-Za-z0-9_]+)?\.weight$")


class AdapterError(Exception):
    """An adapter that cannot be served, with the HTTP status the admin route answers."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)  # both in args: it pickles (frontend processes, Ray)
        self.status = status
        self.message = message

    def __str__(self) -> str:
        return self.message


def is_local(source: str) -> bool:
    """A local path (the same rule as a model's `source`); anything else is a repository id."""
    return is_local_source(source)


def resolve_source(source: str, allowed_dirs: Sequence[str], *, from_config: bool) -> str:
    """The path or repository id vLLM should load `source` from.

    A local source is resolved (links, `..`, `~`) and must lie inside one of `allowed_dirs`
    (resolved the same way); with none configured, only the config's own sources are allowed.
    A repository id is allowed only `from_config`."""
    if not is_local(source):
        if not from_config:
            raise AdapterError(
                400, "an adapter added at run time must come from a local directory (a path starting with /)"
            )
        if not _HUB_ID.fullmatch(source):
            raise AdapterError(
                400, f"'{source[:200]}' is neither a local path nor a Hugging Face repository id"
            )
        return source
    path = os.path.realpath(Path(source).expanduser())
    if not allowed_dirs:
        if from_config:
            return path
        raise AdapterError(403, "this model has no lora.source_dirs: adapters cannot be added at run time")
    for allowed in allowed_dirs:
        root = os.path.realpath(Path(allowed).expanduser())
        if os.path.commonpath([root, path]) == root:
            return path
    raise AdapterError(403, "the adapter's directory is outside the model's lora.source_dirs")


@dataclass(frozen=True)
class AdapterFacts:
    rank: int
    base: str | None  # base_model_name_or_path of adapter_config.json


def _read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    if not file.is_file():
        if (path / MISTRAL_LORA_FILE).is_file():
            raise AdapterError(
                400,
                f"the adapter is in Mistral's own LoRA format ({MISTRAL_LORA_FILE}), which vLLM does not "
                f"read: convert it to PEFT's ({CONFIG_FILE} and adapter_model.safetensors)",
            )
        raise AdapterError(400, f"the adapter's directory has no {CONFIG_FILE} (PEFT's format)")
    if file.stat().st_size > MAX_CONFIG_BYTES:
        raise AdapterError(400, f"{CONFIG_FILE} is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(400, f"{CONFIG_FILE} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise AdapterError(400, f"{CONFIG_FILE} is not a JSON object")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(400, f"the adapter is a {config.get('peft_type')}, not a LORA")
    return config


def _safetensors_shapes(file: Path) -> dict[str, list[int]]:
    """Each tensor's shape from a safetensors file's JSON header."""
    try:
        with file.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > MAX_HEADER_BYTES:
                raise AdapterError(400, f"{file.name}: header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:
        raise AdapterError(400, f"{file.name} is not a safetensors file: {exc}") from None
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def _check_shapes(shapes: dict[str, list[int]], base: ModelShapes, rank: int) -> None:
    for name, shape in shapes.items():
        match = _WEIGHT.search(name)
        if match is None or len(shape) != 2:
            continue
        layer, module, side = int(match.group(1)), match.group(2), match.group(3)
        sizes = base.module(module)
        if layer >= base.layers:
            raise AdapterError(
                400, f"wrong base model: the adapter has layer {layer}, the model {base.layers} layers"
            )
        if sizes is None:
            continue
        expected = [rank, sizes[0]] if side == "A" else [sizes[1], rank]
        if list(shape) != expected:
            raise AdapterError(
                400, f"wrong base model: {name} is {shape}, this model's {module} takes {expected}"
            )


def _names_base(named: str, base_names: Sequence[str]) -> bool:
    def last(name: str) -> str:
        return name.rstrip("/").rsplit("/", 1)[-1].lower()

    return last(named) in {last(n) for n in base_names if n}


def inspect_adapter(
    path: str, *, max_rank: int, shapes: ModelShapes | None, base_names: Sequence[str] = ()
) -> AdapterFacts:
    """Check a local adapter directory; AdapterError (4xx) says what is wrong with it.

    `base_names`: the model's id, aliases and source, which the adapter's
    base_model_name_or_path must name (by last path part) when given."""
    root = Path(path)
    if not root.is_dir():
        raise AdapterError(404, "the adapter's directory does not exist")
    config = _read_config(root)
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise AdapterError(400, f"{CONFIG_FILE}: `r` (the rank) must be a positive integer")
    if rank > max_rank:
        raise AdapterError(
            400, f"the adapter's rank {rank} is larger than the model's max_lora_rank {max_rank}"
        )
    named = config.get("base_model_name_or_path")
    if base_names and isinstance(named, str) and named and not _names_base(named, base_names):
        raise AdapterError(
            400,
            f"wrong base model: the adapter was trained on '{named[:200]}', this model is '{base_names[0]}'",
        )
    weights = next((root / f for f in WEIGHT_FILES if (root / f).is_file()), None)
    if weights is None:
        raise AdapterError(400, f"the adapter's directory has no weights ({', '.join(WEIGHT_FILES)})")
    if shapes is not None and weights.suffix == ".safetensors":
        _check_shapes(_safetensors_shapes(weights), shapes, rank)
    return AdapterFacts(rank=rank, base=named if isinstance(named, str) else None)
