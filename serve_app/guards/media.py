"""Checks on the images of a chat request, before any engine work.

- A model that does not take images rejects `image_url` parts with a clear 400.
- `data:` URLs are always accepted where images are.
- Remote URLs (`http://`, `https://`) of any media part (image, audio, video; with or
  without `type`) make the server fetch them: a server-side request
  forgery risk. They are refused unless the model's config allows their host.
- Anything else (`file:`, other schemes) is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit


class MediaError(ValueError):
    """A request whose images this model may not take; the message is for the client."""


# Parts whose URL vLLM fetches. vLLM infers a part's type from these keys when `type` is
# missing, so the key decides, not `type`.
_URL_KEYS = ("image_url", "audio_url", "video_url")


def _media_urls(messages: Any) -> Iterator[str]:
    if not isinstance(messages, list):
        return
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict):
                continue
            for key in _URL_KEYS:
                if key in part:
                    media = part[key]
                    url = media.get("url") if isinstance(media, dict) else media
                    yield url if isinstance(url, str) else ""


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """`host` is one of the allowed hosts (exactly, as vLLM's own allow-list matches)."""
    host = host.lower().rstrip(".")
    return host in {h.lower().rstrip(".") for h in allowed}


def check_images(body: bytes, *, model_id: str, accepts_images: bool, allowed_hosts: tuple[str, ...]) -> None:
    """Raise MediaError if the chat request carries images this model may not take."""
    if b"_url" not in body:  # cheap: most requests carry no media
        return
    try:
        messages = json.loads(body).get("messages")
    except (ValueError, AttributeError):
        return  # the request model reports the malformed body
    for url in _media_urls(messages):
        if not accepts_images:
            raise MediaError(f"The model `{model_id}` does not accept image input.")
        scheme = urlsplit(url).scheme.lower()
        if scheme == "data":
            continue
        if scheme in ("http", "https"):
            host = urlsplit(url).hostname or ""
            if host_allowed(host, allowed_hosts):
                continue
            raise MediaError(
                f"Fetching media from {host or 'that URL'} is not allowed for `{model_id}`: send the "
                "image inline as a data: URL, or allow the host in the model's media.allowed_remote_hosts."
            )
        raise MediaError("Media URLs must be data: URLs (or http(s) URLs of an allowed host).")
