"""Recognise Mistral's native checkpoint layout, so a model entry needs only an id and a source.

Mistral publishes its models in its own layout: `params.json` (the architecture),
`consolidated*.safetensors` (the weights) and its tokenizer as `tekken.json` or
`tokenizer.model.v<N>`. vLLM reads that layout with `config_format`, `load_format` and
`tokenizer_mode` set to `mistral`, and parses Mistral's tool calls with the `mistral` tool
parser. Many of Mistral's repositories also carry a Hugging Face layout beside it
(`config.json`, `model-*.safetensors`, `tokenizer.json`); Mistral's own guide for vLLM loads
the native one, and so do we. Explicit settings in a model entry always win.

This module imports neither vLLM nor Ray.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

logger = logging.getLogger(__name__)

Layout = Literal["mistral", "hf", "mixed", "unknown"]

MISTRAL_ENGINE_ARGS: dict[str, Any] = {
    "tokenizer_mode": "mistral",
    "config_format": "mistral",
    "load_format": "mistral",
}
MISTRAL_SERVER_ARGS: dict[str, Any] = {
    "tool_call_parser": "mistral",
    "enable_auto_tool_choice": True,
}

_MISTRAL_TOKENIZER = re.compile(r"^(tekken\.json|tokenizer\.model\.v\d+m?\d*)$")
_MISTRAL_WEIGHTS = re.compile(r"^consolidated(\.\d+)?(-\d+-of-\d+)?\.safetensors$")
_HF_WEIGHTS = re.compile(r"^(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)$")


def layout_of(files: Iterable[str]) -> Layout:
    """The layout of a checkpoint from its top-level file names."""
    names = {Path(f).name for f in files if "/" not in f.strip("/")}
    mistral = (
        "params.json" in names
        and any(_MISTRAL_WEIGHTS.match(n) for n in names)
        and any(_MISTRAL_TOKENIZER.match(n) for n in names)
    )
    hf = "config.json" in names and any(_HF_WEIGHTS.match(n) for n in names)
    if mistral and hf:
        return "mixed"
    if mistral:
        return "mistral"
    if hf:
        return "hf"
    return "unknown"


def _local_files(path: Path) -> list[str]:
    return [p.name for p in path.iterdir() if p.is_file()]


def _hub_files(repo_id: str, timeout_s: float = 5.0) -> list[str]:
    """File names of a Hugging Face repository: one bounded request to the hub's model API.

    Empty when the hub cannot be reached (offline, gated without HF_TOKEN, no such repo):
    then nothing is inferred and the entry's own settings stand.
    """
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false"):
        return []
    import httpx

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    token = os.environ.get("HF_TOKEN")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        resp = httpx.get(f"{endpoint}/api/models/{repo_id}", headers=headers, timeout=timeout_s)
        resp.raise_for_status()
        return [s["rfilename"] for s in resp.json().get("siblings", []) if "rfilename" in s]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        logger.info("cannot list %s on the Hugging Face hub (%s): no layout inference", repo_id, exc)
        return []


def source_files(source: str, hub_lister: Callable[[str], list[str]] = _hub_files) -> list[str]:
    """Top-level file names of a model source: a local directory or a hub repository."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _local_files(path)
    if source.startswith(("/", "./", "../", "~")) or source.count("/") != 1:
        return []
    return hub_lister(source)


def infer_args(
    source: str,
    engine_args: dict[str, Any],
    server_args: dict[str, Any],
    hub_lister: Callable[[str], list[str]] = _hub_files,
) -> tuple[dict[str, Any], dict[str, Any], Layout]:
    """Engine and server arguments with Mistral's native-layout settings filled in.

    For a source in Mistral's layout (alone or beside a Hugging Face one) the four Mistral
    settings are added where the entry leaves them unset; nothing else changes.
    """
    layout = layout_of(source_files(source, hub_lister))
    if layout not in ("mistral", "mixed"):
        return dict(engine_args), dict(server_args), layout
    engine = {**MISTRAL_ENGINE_ARGS, **engine_args}
    server = dict(server_args)
    if "tool_call_parser" not in server and "enable_auto_tool_choice" not in server:
        server.update(MISTRAL_SERVER_ARGS)
    return engine, server, layout
