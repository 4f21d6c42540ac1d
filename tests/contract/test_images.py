"""Image input on a real (tiny, random-weight) Pixtral-architecture model in Mistral's layout.

vLLM's CPU build runs it; one import of vLLM's Pixtral module goes through transformers'
torchvision-based image processor, which the CPU venv cannot have, so a small import shim
(tests/support/torchvision_shim) stands in for it. On GPU images torchvision is there.
"""

from __future__ import annotations

import base64
import io
import json
import os
import runpy
from collections.abc import Iterator
from typing import Any

import pytest

from serve_app.config import ModelConfig
from serve_app.engine.protocol import Head, Route
from tests.conftest import ROOT
from tests.contract.test_engine_contract import Harness

SHIM = ROOT / "tests" / "support" / "torchvision_shim"


def _png(width: int, height: int, color: tuple[int, int, int]) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _chat(*urls: str, **extra: Any) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "Describe these images."}]
    parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {
        "model": "tiny-pixtral",
        "messages": [{"role": "user", "content": parts}],
        "max_tokens": 5,
        **extra,
    }


@pytest.fixture(scope="module")
def pixtral() -> Iterator[Harness]:
    from serve_app.engine.vllm.engine import VLLMEngine

    old = os.environ.get("PYTHONPATH")
    # The shim is needed here (vLLM inspects the model in this process too) and in every
    # process vLLM spawns (through PYTHONPATH, where Python finds sitecustomize at start-up).
    runpy.run_path(str(SHIM / "sitecustomize.py"))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SHIM), old) if p)
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    config = ModelConfig(
        id="tiny-pixtral",
        source=str(ROOT / "models" / "tiny-pixtral"),  # Mistral layout: mistral settings inferred
        engine_args={
            "max_model_len": 4096,
            "enforce_eager": True,
            "kv_cache_memory_bytes": 256 << 20,
            "limit_mm_per_prompt": {"image": 2},
        },
        media={"allowed_remote_hosts": ["images.example.com"]},
    )
    from serve_app.serving.builder import resolve_model

    harness = Harness(VLLMEngine(resolve_model(config)))
    try:
        harness.run(harness.engine.start())
        yield harness
    finally:
        harness.run(harness.engine.shutdown())
        harness.loop.close()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _one(harness: Harness, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    items = harness.collect(Route.CHAT, body)
    head = items[0]
    assert isinstance(head, Head) and not head.stream
    return head.status, json.loads(head.body)


def test_several_data_url_images_in_one_prompt(pixtral: Harness) -> None:
    status, body = _one(pixtral, _chat(_png(64, 64, (255, 0, 0)), _png(100, 50, (0, 0, 255))))
    assert status == 200, body
    # 64x64 -> 4x4 patches, 100x50 -> 7x4, each row closed by a break token: ~44 image tokens.
    text_only = _one(
        pixtral, {**_chat(), "messages": [{"role": "user", "content": "Describe these images."}]}
    )[1]
    assert body["usage"]["prompt_tokens"] - text_only["usage"]["prompt_tokens"] >= 44
    assert body["usage"]["completion_tokens"] == 5


def test_the_picture_changes_the_answer(pixtral: Harness) -> None:
    red = _one(pixtral, _chat(_png(64, 64, (255, 0, 0))))[1]
    green = _one(pixtral, _chat(_png(64, 64, (0, 255, 0))))[1]
    assert red["choices"][0]["message"]["content"] != green["choices"][0]["message"]["content"]


def test_more_images_than_allowed_is_a_400(pixtral: Harness) -> None:
    png = _png(32, 32, (1, 2, 3))
    status, body = _one(pixtral, _chat(png, png, png))
    assert status == 400, body
    assert body["error"]["code"] == 400


# What the server must not fetch: a loopback address on a closed port (nothing answers there).
NOT_TO_FETCH = "http://127.0.0.1:9/latest/meta-data/"


def test_remote_image_urls_need_an_allowed_host(pixtral: Harness) -> None:
    status, body = _one(pixtral, _chat(NOT_TO_FETCH))
    assert status == 400
    assert "not allowed" in body["error"]["message"] and body["error"]["param"] == "messages"


def test_a_media_key_spelled_with_escapes_is_checked_too(pixtral: Harness) -> None:
    raw = json.dumps(_chat(NOT_TO_FETCH)).replace('"image_url"', '"image\\u005furl"').encode()
    assert b"_url" not in raw
    items = pixtral.collect(Route.CHAT, raw)
    head = items[0]
    assert isinstance(head, Head) and head.status == 400, head
    assert "not allowed" in json.loads(head.body)["error"]["message"]


def test_an_image_that_decodes_past_the_pixel_limit_is_a_400(pixtral: Harness) -> None:
    status, body = _one(pixtral, _chat(_png(6000, 5000, (0, 0, 0))))  # 30 megapixels, a small file
    assert status == 400, body
    assert "6000x5000 pixels" in body["error"]["message"]
