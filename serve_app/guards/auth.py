"""API keys: who may call the app.

Keys come from the config (as `sha256:<hex>` hashes, so no secret sits in a config file), from
an environment variable or from a file (plain keys, one per line or comma-separated, hashed
as soon as they are read). A request's bearer token is hashed and compared with every stored
hash in constant time. With no key configured, the app is open: then it must listen on
loopback only, unless the config says `allow_unauthenticated: true`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import re
from pathlib import Path

from serve_app.config import AuthOptions, ConfigError, KeySources

ANONYMOUS = "anonymous"  # the caller when the app has no API key

_HASH = re.compile(r"^sha256:([0-9a-f]{64})$")


def hash_key(key: str) -> str:
    """The form a key is stored in: `sha256:<hex>` (`python -m serve_app hash-key` prints it)."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split(text: str) -> list[str]:
    return [k.strip() for k in re.split(r"[,\n]", text) if k.strip() and not k.strip().startswith("#")]


class KeyChecker:
    """Checks `Authorization: Bearer <key>` against the configured keys."""

    def __init__(self, hashes: list[bytes]) -> None:
        self._hashes = hashes

    @classmethod
    def from_options(cls, options: KeySources, what: str = "auth") -> KeyChecker:
        """Read the keys where this process runs (the ingress replica's environment and disk)."""
        hashes = [bytes.fromhex(m.group(1)) for h in options.api_keys if (m := _HASH.match(h))]
        plain: list[str] = []
        if options.api_keys_env and (value := os.environ.get(options.api_keys_env)):
            plain += _split(value)
        if options.api_keys_file:
            path = Path(options.api_keys_file).expanduser()
            if path.exists():  # a missing file is one empty source; no key at all fails below
                try:
                    plain += _split(path.read_text())
                except OSError as exc:
                    raise ConfigError(f"{what}.api_keys_file: cannot read {path}: {exc.strerror}") from None
        hashes += [hashlib.sha256(k.encode()).digest() for k in plain]
        if options.configured and not hashes:
            # Fail closed: keys were asked for and none came (an unset variable, an empty file).
            raise ConfigError(
                f"{what}: keys are configured but none was found "
                f"(api_keys_env={options.api_keys_env!r}, api_keys_file={options.api_keys_file!r})"
            )
        return cls(hashes)

    @property
    def enabled(self) -> bool:
        return bool(self._hashes)

    def knows(self, identity: str) -> bool:
        """Whether `identity` (as `identify` gives it) is one of the configured keys, or
        anonymous when none is configured."""
        if not self._hashes:
            return identity == ANONYMOUS
        if not identity.startswith("sha256:"):
            return False
        try:
            digest = bytes.fromhex(identity[len("sha256:") :])
        except ValueError:
            return False
        return self._matches(digest)

    def _matches(self, digest: bytes) -> bool:
        found = False
        for stored in self._hashes:  # every hash is compared: the time does not tell which matched
            found |= hmac.compare_digest(digest, stored)
        return found

    def allows(self, authorization: str | None) -> bool:
        return self.identify(authorization) is not None

    def identify(self, authorization: str | None) -> str | None:
        """The caller's identity: the `sha256:<hex>` hash of its key, `anonymous` when no key
        is configured, or None when the key is missing or wrong."""
        if not self._hashes:
            return ANONYMOUS
        if not authorization or not authorization.startswith("Bearer "):
            return None
        digest = hashlib.sha256(authorization[len("Bearer ") :].strip().encode()).digest()
        return "sha256:" + digest.hex() if self._matches(digest) else None


def check_exposure(host: str, options: AuthOptions, where: str) -> None:
    """Refuse to serve beyond loopback without keys, unless the config says so explicitly."""
    if is_loopback(host) or options.configured or options.allow_unauthenticated:
        return
    raise ConfigError(
        f"{where}: the app would listen on {host} without API keys; configure auth.api_keys, "
        "auth.api_keys_env or auth.api_keys_file, or set auth.allow_unauthenticated: true"
    )
