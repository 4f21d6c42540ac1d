"""Answers the tests expect word for word, in one place."""

from __future__ import annotations

from typing import Any


def model_not_found(name: str) -> dict[str, Any]:
    """The 404 body for a model nobody serves: the same as `vllm serve` gives."""
    return {
        "error": {
            "message": f"The model `{name}` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
