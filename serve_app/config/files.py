"""Reading configs: application args and Ray Serve config files, with errors that name the
file and the field."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from serve_app.config.app import AppConfig
from serve_app.config.base import ConfigError
from serve_app.config.model import ModelConfig

BUILDER_IMPORT_PATH = "serve_app.serving.builder:build_app"
# The import path before the package was arranged by role (0.1): named in errors, not accepted.
FORMER_IMPORT_PATHS = ("serve_app.builder:build_app",)


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _format_errors(source: str, err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = _format_loc(tuple(e["loc"]))
        if prefix:
            loc = prefix if loc == "(top level)" else f"{prefix}.{loc}"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{source}: {loc}: {msg}")
    return "\n".join(lines)


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def _load_model(entry: Any, index: int, source: str, base_dir: Path) -> ModelConfig:
    where, prefix = source, f"models[{index}]"
    if isinstance(entry, str):
        path = Path(entry).expanduser()
        if not path.is_absolute():
            path = base_dir / path
        entry = read_yaml(path)
        where, prefix = str(path), ""
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: {prefix or '(top level)'}: a model must be a mapping or a file path")
    try:
        return ModelConfig.model_validate(dict(entry))
    except ValidationError as exc:
        raise ConfigError(_format_errors(where, exc, prefix)) from None


def load_app_config(
    args: Any, *, source: str = "application args", base_dir: Path | None = None
) -> AppConfig:
    """Validate application args (the `args:` of a Serve application).

    Model entries that are strings are paths to model files, relative to `base_dir`
    (default: the current directory, which is the working_dir on a Ray cluster).
    """
    if isinstance(args, AppConfig):
        return args
    if not isinstance(args, Mapping):
        raise ConfigError(f"{source}: (top level): expected a mapping with a `models` list")
    base = base_dir or Path.cwd()
    raw = dict(args)
    models = raw.get("models")
    if isinstance(models, list):
        raw["models"] = [_load_model(m, i, source, base) for i, m in enumerate(models)]
    try:
        return AppConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None


class ServeFile(BaseModel):
    """The parts of a Ray Serve config file that `serve_app run` reads."""

    model_config = ConfigDict(extra="allow")

    path: Path
    http_host: str
    http_port: int
    app_name: str
    route_prefix: str
    args: dict[str, Any]


def load_serve_file(path: Path) -> ServeFile:
    """Read a Ray Serve config file and pick the application built by this package."""
    data = read_yaml(path)
    if not isinstance(data, Mapping) or not isinstance(data.get("applications"), list):
        raise ConfigError(f"{path}: (top level): a Serve config needs an `applications` list")
    ours = [
        (i, a)
        for i, a in enumerate(data["applications"])
        if isinstance(a, Mapping) and a.get("import_path") == BUILDER_IMPORT_PATH
    ]
    former = [
        i
        for i, a in enumerate(data["applications"])
        if isinstance(a, Mapping) and a.get("import_path") in FORMER_IMPORT_PATHS
    ]
    if former and not ours:
        raise ConfigError(
            f"{path}: applications[{former[0]}].import_path: the builder moved; "
            f"write '{BUILDER_IMPORT_PATH}' (README.md, Configuration)"
        )
    if len(ours) != 1:
        raise ConfigError(
            f"{path}: applications: expected exactly one application with "
            f"import_path '{BUILDER_IMPORT_PATH}', found {len(ours)}"
        )
    index, app = ours[0]
    http = data.get("http_options") or {}
    if not isinstance(http, Mapping):
        raise ConfigError(f"{path}: http_options: must be a mapping")
    args = app.get("args") or {}
    if not isinstance(args, Mapping):
        raise ConfigError(f"{path}: applications[{index}].args: must be a mapping")
    return ServeFile(
        path=path,
        http_host=str(http.get("host", "127.0.0.1")),
        http_port=int(http.get("port", 8000)),
        app_name=str(app.get("name", "default")),
        route_prefix=str(app.get("route_prefix", "/")),
        args=dict(args),
    )
