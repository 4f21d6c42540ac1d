"""Checks on the images of a chat request, before any engine work.

- A model that does not take images rejects `image_url` parts with a clear 400.
- `data:` URLs are always accepted where images are.
- Remote URLs (`http://`, `https://`) make the server fetch them: a server-side request
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


def _image_urls(messages: Any) -> Iterator[str]:
    if not isinstance(messages, list):
        return
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "image_url":
                continue
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            yield url if isinstance(url, str) else ""


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """`host` is one of the allowed hosts (exactly, as vLLM's own allow-list matches)."""
    host = host.lower().rstrip(".")
    return host in {h.lower().rstrip(".") for h in allowed}


def check_images(body: bytes, *, model_id: str, accepts_images: bool, allowed_hosts: tuple[str, ...]) -> None:
    """Raise MediaError if the chat request carries images this model may not take."""
    if b"image_url" not in body:  # cheap: most requests carry no image
        return
    try:
        messages = json.loads(body).get("messages")
    except (ValueError, AttributeError):
        return  # the request model reports the malformed body
    for url in _image_urls(messages):
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
                f"Fetching images from {host or 'that URL'} is not allowed for `{model_id}`: send the "
                "image inline as a data: URL, or allow the host in the model's media.allowed_remote_hosts."
            )
        raise MediaError("image_url must be a data: URL (or an http(s) URL of an allowed host).")
