"""Mistral-layout inference on model directories: each layout, and a mixed one."""

from __future__ import annotations

from pathlib import Path

import pytest

from serve_app.models.mistral_layout import infer_args, layout_of, source_files

MISTRAL_V3 = ["params.json", "consolidated.safetensors", "tokenizer.model.v3"]
MISTRAL_TEKKEN = ["params.json", "consolidated.safetensors", "tekken.json"]
MISTRAL_SHARDED = [
    "params.json",
    "consolidated-00001-of-00002.safetensors",
    "consolidated-00002-of-00002.safetensors",
    "tekken.json",
]
HF = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "tokenizer.json"]


def _dir(tmp_path: Path, files: list[str]) -> Path:
    for name in files:
        (tmp_path / name).write_text("{}")
    return tmp_path


@pytest.mark.parametrize(
    ("files", "layout"),
    [
        (MISTRAL_V3, "mistral"),
        (MISTRAL_TEKKEN, "mistral"),
        (MISTRAL_SHARDED, "mistral"),
        (["params.json", "consolidated.safetensors", "tokenizer.model.v7m1"], "mistral"),
        (HF, "hf"),
        (["config.json", "pytorch_model.bin"], "hf"),
        (MISTRAL_TEKKEN + HF, "mixed"),
        (["params.json", "consolidated.safetensors"], "unknown"),  # no Mistral tokenizer
        (["params.json", "tekken.json", "model.safetensors"], "unknown"),
        ([], "unknown"),
    ],
)
def test_layout_of(tmp_path: Path, files: list[str], layout: str) -> None:
    assert layout_of(source_files(str(_dir(tmp_path, files)))) == layout


@pytest.mark.parametrize("files", [MISTRAL_V3, MISTRAL_TEKKEN, MISTRAL_TEKKEN + HF])
def test_mistral_layout_gets_mistral_settings(tmp_path: Path, files: list[str]) -> None:
    engine, server, _ = infer_args(str(_dir(tmp_path, files)), {"max_model_len": 4096}, {})
    assert engine == {
        "tokenizer_mode": "mistral",
        "config_format": "mistral",
        "load_format": "mistral",
        "max_model_len": 4096,
    }
    assert server == {"tool_call_parser": "mistral", "enable_auto_tool_choice": True}


def test_explicit_settings_win(tmp_path: Path) -> None:
    source = str(_dir(tmp_path, MISTRAL_TEKKEN + HF))
    engine, server, layout = infer_args(
        source, {"load_format": "safetensors", "config_format": "hf"}, {"tool_call_parser": "hermes"}
    )
    assert layout == "mixed"
    assert engine["load_format"] == "safetensors" and engine["config_format"] == "hf"
    assert engine["tokenizer_mode"] == "mistral"
    assert server == {"tool_call_parser": "hermes"}


def test_hf_layout_is_left_alone(tmp_path: Path) -> None:
    engine, server, layout = infer_args(str(_dir(tmp_path, HF)), {}, {})
    assert (engine, server, layout) == ({}, {}, "hf")


def test_hub_repository_is_listed_through_the_hub() -> None:
    seen = []

    def lister(repo: str) -> list[str]:
        seen.append(repo)
        return ["README.md", *MISTRAL_TEKKEN, *HF]

    engine, _, layout = infer_args("mistralai/Mistral-Nemo-Instruct-2407", {}, {}, hub_lister=lister)
    assert seen == ["mistralai/Mistral-Nemo-Instruct-2407"]
    assert layout == "mixed" and engine["load_format"] == "mistral"


def test_offline_hub_means_no_inference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    engine, server, layout = infer_args("mistralai/Mistral-Nemo-Instruct-2407", {}, {})
    assert (engine, server, layout) == ({}, {}, "unknown")


def test_missing_local_directory_is_not_sent_to_the_hub() -> None:
    called = []
    infer_args("./no/such/dir", {}, {}, hub_lister=lambda r: called.append(r) or [])
    assert called == []


def test_demo_models_are_recognised() -> None:
    from tests.conftest import ROOT

    for name in ("tiny-mistral-v3", "tiny-mistral-tekken"):
        assert layout_of(source_files(str(ROOT / "models" / name))) == "mistral"
