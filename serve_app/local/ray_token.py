"""Ray's token authentication, as a client of Ray's dashboard sees it.

Ray 2.60 starts a new local instance with token authentication on, and its dashboard (the web
page and the REST API) asks for the token. Like Ray, this reads `$RAY_AUTH_TOKEN`, else the file
`$RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token`.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TOKEN_PATH = Path("~/.ray/auth_token")


def token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or DEFAULT_TOKEN_PATH).expanduser()


def token_hint() -> str:
    """Where a person finds the token, for a message."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return "Ray's token authentication is off (RAY_AUTH_MODE=disabled)"
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "sign in with the token in $RAY_AUTH_TOKEN"
    return f"sign in with the token in {token_path()} (or `ray get-auth-token`)"


def auth_headers() -> dict[str, str]:
    """The `Authorization` header of Ray's dashboard API; none where no token is found."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = token_path()
        token = path.read_text().strip() if path.is_file() else None
    return {"Authorization": f"Bearer {token}"} if token else {}
