"""Checks on the media of a chat or tokenize request, before any engine work.

They read the decoded messages, never the raw body: JSON spells a key in more than one way
(`"image\\u005furl"` is `"image_url"`), and vLLM acts on the decoded one.

- A model that does not take images rejects media parts with a clear 400.
- `data:` URLs are accepted where images are, up to `max_image_pixels` (read from the image's
  header before anything decodes it: a small file can decode to hundreds of MB).
- Remote URLs (`http://`, `https://`) of any media part (image, audio, video; with or
  without `type`) make the server fetch them: a server-side request
  forgery risk. They are refused unless the model's config allows their host (and vLLM's own
  allow-list is set to the same hosts, serve_app.engine.vllm.args).
- Anything else (`file:`, other schemes) is refused.
"""

from __future__ import annotations

import base64
import io
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


def check_media(
    messages: Any,
    *,
    model_id: str,
    accepts_images: bool,
    allowed_hosts: tuple[str, ...],
    max_image_pixels: int,
) -> None:
    """Raise MediaError if the decoded `messages` carry media this model may not take."""
    for url in _media_urls(messages):
        if not accepts_images:
            raise MediaError(f"The model `{model_id}` does not accept image input.")
        scheme = urlsplit(url).scheme.lower()
        if scheme == "data":
            _check_pixels(url, max_image_pixels)
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


def _check_pixels(url: str, max_pixels: int) -> None:
    """Refuse a base64 data: URL image larger than `max_pixels`, from its header alone; what is
    not an image is vLLM's to report."""
    header, _, data = url.partition(",")
    if not header.endswith(";base64"):
        return
    try:
        from PIL import Image

        with Image.open(io.BytesIO(base64.b64decode(data, validate=False))) as image:
            width, height = image.size  # the header only: nothing is decoded
    except Exception:  # not an image PIL knows
        return
    if width * height > max_pixels:
        raise MediaError(
            f"An image is {width}x{height} pixels; the limit is {max_pixels} pixels (limits.max_image_pixels)."
        )
