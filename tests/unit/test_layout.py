"""The package's rooms and who may import whom (serve_app/__init__.py draws the map).

Every import in every module counts, those inside functions too: a lazy import is still a
dependency. The serving path (what `serve deploy` runs) never imports the local launcher or
the operator tools, only the vLLM engine imports vLLM, and only the tools import the tools'
own dependencies.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "serve_app"

# room -> the rooms its modules may import (besides their own)
MAY_IMPORT: dict[str, set[str]] = {
    "errors": set(),
    "config": set(),
    "models": {"config", "errors"},
    "guards": {"config", "errors", "models"},  # a checkpoint's layout (LoRA adapters must fit it)
    "engine": {"config", "errors", "guards"},
    "serving": {"config", "errors", "models", "engine", "guards"},
    "local": {"config", "errors", "models", "engine", "guards", "serving"},
    "tools": {"config", "errors", "models", "engine", "guards", "serving", "local"},
    "__main__": {"local"},
    "__init__": set(),
}
SERVING_PATH = ("errors", "config", "models", "guards", "engine", "serving")
TOOLS_ONLY = ("aiohttp", "matplotlib")


def _room(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _modules() -> Iterator[Path]:
    yield from sorted(PACKAGE.rglob("*.py"))


def _imports(source: str, package: str) -> Iterator[tuple[int, str]]:
    """(line, module) of every import in a module of `package`, relative ones resolved."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                yield node.lineno, f"{base}.{node.module}" if node.module else base
            else:
                assert node.module is not None
                yield node.lineno, node.module
                for alias in node.names:  # `from serve_app import config`
                    if node.module == "serve_app":
                        yield node.lineno, f"serve_app.{alias.name}"


def test_every_module_lies_in_a_room() -> None:
    rooms = {_room(path) for path in _modules()}
    assert rooms <= set(MAY_IMPORT), f"modules outside the map: {sorted(rooms - set(MAY_IMPORT))}"


@pytest.mark.parametrize("path", list(_modules()), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_rooms_import_only_what_the_map_allows(path: Path) -> None:
    room = _room(path)
    allowed = MAY_IMPORT[room] | {room}
    wrong = []
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for line, module in _imports(path.read_text(), package):
        parts = module.split(".")
        if parts[0] == "serve_app" and len(parts) > 1 and parts[1] not in allowed:
            wrong.append(f"line {line}: {module}")
        if parts[0] == "vllm" and not path.is_relative_to(PACKAGE / "engine" / "vllm"):
            wrong.append(f"line {line}: {module} (only serve_app.engine.vllm imports vLLM)")
        if parts[0] in TOOLS_ONLY and room in SERVING_PATH:
            wrong.append(f"line {line}: {module} (a dependency of the tools extra)")
    assert not wrong, f"{path.relative_to(ROOT)} ({room}) imports: " + "; ".join(wrong)


def test_the_map_keeps_the_serving_path_free_of_local_running_and_tools() -> None:
    for room in SERVING_PATH:
        assert not MAY_IMPORT[room] & {"local", "tools"}, room


def test_the_import_finder_sees_lazy_and_relative_imports() -> None:
    source = "def f():\n    from serve_app.tools import load\n    from . import builder\n    import vllm\n"
    found = [name for _, name in _imports(source, "serve_app.serving")]
    assert found == ["serve_app.tools", "serve_app.serving", "vllm"]
