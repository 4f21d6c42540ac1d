"""Config validation: good files load; each kind of bad file fails naming file and field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from serve_app.config import (
    AppConfig,
    ConfigError,
    ModelConfig,
    load_app_config,
    load_serve_file,
)
from tests.conftest import ROOT

MINIMAL: dict[str, Any] = {"id": "m", "source": "org/m"}


def _app(tmp_path: Path, data: object, name: str = "app.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize("name", ["local.yaml", "production.yaml"])
def test_shipped_serve_configs_load(name: str) -> None:
    serve_file = load_serve_file(ROOT / "configs" / name)
    config = load_app_config(serve_file.args)
    assert config.models
    assert all(m.engine_args["tokenizer_mode"] == "mistral" for m in config.models)


def test_local_config_reads_model_files() -> None:
    serve_file = load_serve_file(ROOT / "configs/local.yaml")
    config = load_app_config(serve_file.args)
    assert [m.id for m in config.models] == ["tiny-mistral-v3", "tiny-mistral-tekken"]
    assert serve_file.http_host == "127.0.0.1"
    assert config.find("mistral-7b-demo") is config.models[0]
    assert config.find("nope") is None


def test_production_config_has_the_three_models() -> None:
    config = load_app_config(load_serve_file(ROOT / "configs/production.yaml").args)
    ids = {m.id for m in config.models}
    assert ids == {
        "mistralai/Mistral-Nemo-Instruct-2407",
        "mistralai/Mistral-Small-Instruct-2409",
        "mistralai/Pixtral-12B-2409",
    }
    pixtral = config.find("mistralai/Pixtral-12B-2409")
    assert pixtral is not None and pixtral.engine_args["limit_mm_per_prompt"]["image"] > 1
    small = config.find("mistral-small")
    assert small is not None and small.gpus_per_replica == 2


def test_defaults_and_derived_names() -> None:
    model = ModelConfig.model_validate({"id": "mistralai/Mistral-Nemo-Instruct-2407", "source": "x"})
    assert model.deployment_name == "mistralai--Mistral-Nemo-Instruct-2407"
    assert model.gpus_per_replica == 1.0
    assert model.names == ("mistralai/Mistral-Nemo-Instruct-2407",)
    tp = ModelConfig.model_validate({**MINIMAL, "engine_args": {"tensor_parallel_size": 4}})
    assert tp.gpus_per_replica == 4.0
    cpu = ModelConfig.model_validate({**MINIMAL, "num_gpus": 0})
    assert cpu.gpus_per_replica == 0.0


def test_every_field_is_described() -> None:
    from serve_app import config as cfg

    models = [m for m in vars(cfg).values() if isinstance(m, type) and issubclass(m, cfg.StrictModel)]
    assert len(models) >= 12
    for model in models:
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


@pytest.mark.parametrize(
    ("models", "expected"),
    [
        ([{**MINIMAL, "sourc": "x"}], "models[0].sourc: unknown field"),
        ([{"id": "m"}], "models[0].source: Field required"),
        ([{**MINIMAL, "num_gpus": "two"}], "models[0].num_gpus"),
        ([{**MINIMAL, "engine_args": {"model": "x"}}], "models[0].engine_args"),
        (
            [{**MINIMAL, "deployment": {"max_ongoing_requests": 0}}],
            "models[0].deployment.max_ongoing_requests",
        ),
        (
            [{**MINIMAL, "deployment": {"num_replicas": 2, "autoscaling": {"max_replicas": 3}}}],
            "set either num_replicas or autoscaling",
        ),
        (
            [{**MINIMAL, "deployment": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}}],
            "min_replicas (3) is above max_replicas (2)",
        ),
        ([MINIMAL, {**MINIMAL, "source": "y"}], "model name 'm' is used twice"),
        ([MINIMAL, {"id": "n", "source": "y", "aliases": ["m"]}], "model name 'm' is used twice"),
        ([{**MINIMAL, "id": "a/b"}, {**MINIMAL, "id": "a--b"}], "same deployment name"),
        ([], "models: Tuple should have at least 1 item"),
        ([42], "models[0]: a model must be a mapping or a file path"),
    ],
)
def test_bad_app_config_names_file_and_field(tmp_path: Path, models: list[Any], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_app_config({"models": models}, source="my.yaml", base_dir=tmp_path)
    assert str(err.value).startswith("my.yaml: ")
    assert expected in str(err.value)


def test_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError, match=r"src: modles: unknown field"):
        load_app_config({"models": [MINIMAL], "modles": []}, source="src")


def test_model_file_errors_name_the_model_file(tmp_path: Path) -> None:
    bad = _app(tmp_path, {"id": "m", "source": "x", "engine_args": []}, "bad-model.yaml")
    with pytest.raises(ConfigError) as err:
        load_app_config({"models": ["bad-model.yaml"]}, base_dir=tmp_path)
    assert str(err.value).startswith(f"{bad}: engine_args:")


def test_missing_model_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: cannot read"):
        load_app_config({"models": ["nowhere.yaml"]}, base_dir=tmp_path)


def test_model_file_not_yaml(tmp_path: Path) -> None:
    _app(tmp_path, "id: [unclosed", "broken.yaml")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML"):
        load_app_config({"models": ["broken.yaml"]}, base_dir=tmp_path)


def test_serve_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="needs an `applications` list"):
        load_serve_file(_app(tmp_path, {"http_options": {}}))
    with pytest.raises(ConfigError, match="found 0"):
        load_serve_file(_app(tmp_path, {"applications": [{"import_path": "other:app"}]}))
    with pytest.raises(ConfigError, match=r"applications\[0\]\.args: must be a mapping"):
        load_serve_file(
            _app(
                tmp_path,
                {"applications": [{"import_path": "serve_app.serving.builder:build_app", "args": [1]}]},
            )
        )


def test_the_former_import_path_is_named_with_the_new_one(tmp_path: Path) -> None:
    old = {"applications": [{"name": "mistral", "import_path": "serve_app.builder:build_app", "args": {}}]}
    with pytest.raises(
        ConfigError, match=r"applications\[0\]\.import_path: .*'serve_app\.serving\.builder:build_app'"
    ):
        load_serve_file(_app(tmp_path, old))


def test_config_is_immutable() -> None:
    config = AppConfig.model_validate({"models": [MINIMAL]})
    with pytest.raises(ValueError):
        config.models[0].id = "other"  # type: ignore[misc]


def test_batch_preemption_is_on_off_or_by_model() -> None:
    for value in (True, False, "model"):
        config = load_app_config({"models": [MINIMAL], "batches": {"preempt": value}}, source="src")
        assert config.batches.preempt == value
    with pytest.raises(ConfigError, match=r"src: batches\.preempt"):
        load_app_config({"models": [MINIMAL], "batches": {"preempt": "app"}}, source="src")
