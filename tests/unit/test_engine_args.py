"""vLLM's own checks on engine arguments run when an application is built (imports vLLM, no Ray)."""

from __future__ import annotations

from typing import Any

import pytest

from serve_app.config import ConfigError, ModelConfig
from serve_app.engine.vllm.args import build_namespace, validate_engine_args


def _model(**engine_args: Any) -> ModelConfig:
    return ModelConfig(id="m", source="mistralai/Mistral-Nemo-Instruct-2407", engine_args=engine_args)


def test_valid_mistral_engine_args() -> None:
    validate_engine_args(
        _model(tokenizer_mode="mistral", config_format="mistral", load_format="mistral", max_model_len=8192)
    )


def test_unknown_engine_arg_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError, match=r"engine_args\.tokenizer_mod: .*did you mean 'tokenizer_mode'"):
        validate_engine_args(_model(tokenizer_mod="mistral"))


def test_engine_arg_of_the_wrong_type() -> None:
    with pytest.raises(ConfigError, match=r"model 'm': engine_args\.max_model_len: .*integer"):
        validate_engine_args(_model(max_model_len="long"))


def test_engine_arg_outside_its_choices() -> None:
    with pytest.raises(ConfigError, match=r"engine_args\.dtype"):
        validate_engine_args(_model(dtype="bf16"))


def test_server_args_are_checked_against_vllm_serve() -> None:
    with pytest.raises(ConfigError, match=r"server_args\.tool_parser: .*tool_call_parser"):
        validate_engine_args(ModelConfig(id="m", source="x", server_args={"tool_parser": "mistral"}))


def test_namespace_matches_vllm_serve_flags() -> None:
    config = ModelConfig(
        id="mistral-nemo",
        aliases=("nemo",),
        source="mistralai/Mistral-Nemo-Instruct-2407",
        engine_args={"tokenizer_mode": "mistral", "max_model_len": 4096},
        server_args={"tool_call_parser": "mistral", "enable_auto_tool_choice": True},
    )
    ns = build_namespace(config)
    assert ns.model == "mistralai/Mistral-Nemo-Instruct-2407"
    assert ns.served_model_name == ["mistral-nemo", "nemo"]
    assert (ns.tokenizer_mode, ns.max_model_len) == ("mistral", 4096)
    assert ns.tool_call_parser == "mistral" and ns.enable_auto_tool_choice is True
    # The shared default namespace is not modified.
    assert build_namespace(ModelConfig(id="x", source="y")).max_model_len is None


def test_vllm_fetches_media_only_from_the_allowed_hosts() -> None:
    from serve_app.engine.vllm.args import NO_MEDIA_HOST

    # vLLM reads an empty allow-list as "any host": none allowed must not be left empty.
    assert build_namespace(ModelConfig(id="p", source="x")).allowed_media_domains == [NO_MEDIA_HOST]
    allowed = ModelConfig(id="p", source="x", media={"allowed_remote_hosts": ["images.example.com"]})
    assert build_namespace(allowed).allowed_media_domains == ["images.example.com"]
