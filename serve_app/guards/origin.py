"""What a web page could send a keyless app on loopback, refused.

A page in a browser on the same machine can POST to http://127.0.0.1:8000 without asking the
server first, if the request is one a form could send (`text/plain`, form encodings: CORS's
"simple requests"), and can read the answers if it reaches the server under a name it owns
whose address it points at 127.0.0.1 (DNS rebinding). An app with API keys is safe from both
(the page has no key); an app without keys that listens on loopback answers only JSON bodies
(which a page cannot send cross-site without the server's leave, and CORS is closed) and only
requests that name it by a loopback host. An app that serves beyond loopback without keys
(`auth.allow_unauthenticated`, behind a gateway) is the gateway's to guard.
"""

from __future__ import annotations

from collections.abc import Mapping

from serve_app.errors import ApiError
from serve_app.guards.auth import is_loopback

# The content types a JSON API is sent; anything a form or a plain `fetch` can send is not.
JSON_TYPES = ("application/json",)


def host_name(host: str) -> str:
    """The name in a Host header, without its port: `[::1]:8000` -> `::1`."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def check_local_origin(headers: Mapping[str, str], *, has_body: bool) -> None:
    """Raise ApiError unless a request to a keyless loopback app could not come from a web page:
    421 for a Host that is not a loopback name, 415 for a body that is not JSON."""
    host = headers.get("host", "")
    if not is_loopback(host_name(host).lower()):
        raise ApiError(
            421,
            "This server has no API keys and answers only requests to a loopback host name "
            "(localhost, 127.0.0.1, ::1).",
        )
    if has_body:
        kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind not in JSON_TYPES:
            raise ApiError(415, "Send the request body as JSON, with `Content-Type: application/json`.")


def check_local_upload(headers: Mapping[str, str]) -> None:
    """As `check_local_origin`, for a file upload (`multipart/form-data`, which a form can send):
    it must also carry an `Authorization` header, which no form can set, and which a page's
    script can set only after asking the server, whose CORS is closed (OpenAI's clients send one
    always, with any key)."""
    check_local_origin(headers, has_body=False)
    kind = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "multipart/form-data":
        raise ApiError(415, "Upload the file as multipart/form-data.")
    if "authorization" not in headers:
        raise ApiError(
            403,
            "This server has no API keys: an upload must still carry an `Authorization` header "
            "(any value), as OpenAI's clients send, so that no web page can send one.",
        )
