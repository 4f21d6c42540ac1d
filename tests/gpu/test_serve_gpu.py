"""The whole app on a GPU: skipped on machines without CUDA (CI); see gpu_checks.py."""

from __future__ import annotations

import json

import pytest

from tests.gpu.gpu_checks import gpu_available, run_checks

pytestmark = pytest.mark.skipif(not gpu_available(), reason="needs a CUDA GPU and the 7B-shaped model")


def test_app_on_gpu() -> None:
    results = run_checks()
    print(json.dumps(results))
    assert results["ok"]
