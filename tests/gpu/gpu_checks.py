"""Checks of the whole app on a GPU machine: Ray Serve + vLLM CUDA engine, 7B-shaped model.

Run by tests/gpu/test_serve_gpu.py under pytest, or directly where pytest is not installed
(the lent GPU machine, with vLLM 0.24.0 + Ray 2.60.0):

    MISTRAL_SERVE_GPU_MODEL=/tmp/mistral7b-dummy python3 tests/gpu/gpu_checks.py
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = os.environ.get("MISTRAL_SERVE_GPU_MODEL", "/tmp/mistral7b-dummy")


def _cuda() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def _model() -> dict[str, Any]:
    return {
        "id": "mistral-7b-dummy",
        "source": MODEL_DIR,
        "engine_args": {
            "tokenizer_mode": "mistral",
            "load_format": "dummy",  # random weights of the real shape: real compute
            "max_model_len": 4096,
            "gpu_memory_utilization": 0.85,
        },
        "server_args": {"tool_call_parser": "mistral", "enable_auto_tool_choice": True},
        "deployment": {"num_replicas": 1},
    }


def run_checks() -> dict[str, Any]:
    import httpx
    import ray
    import vllm
    from ray import serve

    from serve_app.config import load_app_config
    from serve_app.serving.builder import build_openai_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    config = load_app_config({"models": [_model()]})
    started = time.monotonic()
    ray.init(include_dashboard=False, log_to_driver=False)
    results: dict[str, Any] = {"vllm": vllm.__version__, "ray": ray.__version__}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_openai_app(config), name="gpu", route_prefix="/")
        results["startup_s"] = round(time.monotonic() - started, 1)
        msgs = [{"role": "user", "content": "Who is the best French painter?"}]
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "mistral-7b-dummy", "messages": msgs, "max_tokens": 16, "ignore_eos": True},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 16
        body = {
            "model": "mistral-7b-dummy",
            "messages": msgs,
            "max_tokens": 8,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as resp:
            text = resp.read().decode()
        assert resp.status_code == 200 and text.endswith("data: [DONE]\n\n"), text[-200:]
        assert '"completion_tokens":8' in text.replace(" ", "")
        r = httpx.post(
            f"{url}/v1/completions",
            json={"model": "mistral-7b-dummy", "prompt": "Paris is", "max_tokens": 4},
            timeout=120,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 4, r.text
        r = httpx.post(f"{url}/tokenize", json={"model": "mistral-7b-dummy", "prompt": "Bonjour"}, timeout=60)
        assert r.status_code == 200 and r.json()["count"] >= 2, r.text
        r = httpx.post(
            f"{url}/v1/chat/completions", json={"model": "mistral-7b-dummy", "messages": "x"}, timeout=60
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == 400, r.text
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "mistral-7b-dummy", "messages": msgs, "max_tokens": 9999},
            timeout=60,
        )
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens", r.text
        r = httpx.post(f"{url}/v1/chat/completions", json={"model": "nope", "messages": msgs}, timeout=60)
        assert r.status_code == 404
        tools = [
            {
                "type": "function",
                "function": {
                    "name": "f",
                    "parameters": {
                        "type": "object",
                        "properties": {"a": {"type": "string"}},
                        "required": ["a"],
                    },
                },
            }
        ]
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={
                "model": "mistral-7b-dummy",
                "messages": msgs,
                "tools": tools,
                "tool_choice": "required",
                "max_tokens": 40,
            },
            timeout=120,
        )
        assert r.status_code == 200, r.text
        results["tool_call"] = r.json()["choices"][0]["message"].get("tool_calls") is not None
        results["ok"] = True
    finally:
        serve.shutdown()
        ray.shutdown()
    return results


def gpu_available() -> bool:
    return _cuda() and Path(MODEL_DIR).is_dir()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(run_checks()))
