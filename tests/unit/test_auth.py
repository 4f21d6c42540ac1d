"""API keys: hashing, sources, constant-time checks, failing closed, and the exposure rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from serve_app.config import AuthOptions, ConfigError
from serve_app.guards.auth import KeyChecker, check_exposure, hash_key
from serve_app.local.cli import main as cli


def test_hash_key_form() -> None:
    h = hash_key("s3cret")
    assert h.startswith("sha256:") and len(h) == 7 + 64
    assert hash_key("s3cret") == h != hash_key("s3cret ")


def test_plain_keys_are_refused_in_config() -> None:
    with pytest.raises(ValueError, match="not plain keys"):
        AuthOptions(api_keys=("my-plain-key",))


def test_keys_from_config_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keyfile = tmp_path / "keys"
    keyfile.write_text("# team keys\nfile-key-1\nfile-key-2\n")
    monkeypatch.setenv("TEST_KEYS", "env-key-1, env-key-2")
    checker = KeyChecker.from_options(
        AuthOptions(api_keys=(hash_key("config-key"),), api_keys_env="TEST_KEYS", api_keys_file=str(keyfile))
    )
    assert checker.enabled
    for key in ("config-key", "env-key-1", "env-key-2", "file-key-1", "file-key-2"):
        assert checker.allows(f"Bearer {key}"), key
    for header in (
        None,
        "",
        "Bearer",
        "Bearer wrong",
        "Basic config-key",
        "config-key",
        "Bearer # team keys",
    ):
        assert not checker.allows(header), header


def test_no_keys_configured_means_open() -> None:
    checker = KeyChecker.from_options(AuthOptions())
    assert not checker.enabled and checker.allows(None)


def test_configured_source_without_keys_fails_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNSET_KEYS", raising=False)
    with pytest.raises(ConfigError, match="none was found"):
        KeyChecker.from_options(
            AuthOptions(api_keys_env="UNSET_KEYS", api_keys_file=str(tmp_path / "missing"))
        )
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="none was found"):
        KeyChecker.from_options(AuthOptions(api_keys_file=str(tmp_path / "empty")))


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_loopback_needs_no_keys(host: str) -> None:
    check_exposure(host, AuthOptions(), "here")


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.10", "::"])
def test_beyond_loopback_needs_keys_or_an_explicit_opt_out(host: str) -> None:
    with pytest.raises(ConfigError, match="without API keys"):
        check_exposure(host, AuthOptions(), "here")
    check_exposure(host, AuthOptions(api_keys_env="KEYS"), "here")
    check_exposure(host, AuthOptions(allow_unauthenticated=True), "here")


def test_cli_refuses_an_open_config_beyond_loopback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = {
        "http_options": {"host": "0.0.0.0", "port": 8000},
        "applications": [
            {
                "name": "x",
                "import_path": "serve_app.serving.builder:build_app",
                "args": {"models": [{"id": "m", "source": "x", "engine": "fake"}]},
            }
        ],
    }
    path = tmp_path / "open.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli(["check", str(path)]) == 2
    assert "without API keys" in capsys.readouterr().err
    config["applications"][0]["args"]["auth"] = {"allow_unauthenticated": True}  # type: ignore[index]
    path.write_text(yaml.safe_dump(config))
    assert cli(["check", str(path)]) == 0


def test_cli_hash_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(["hash-key", "abc"]) == 0
    assert capsys.readouterr().out.strip() == hash_key("abc")
