"""Media checks: data URLs pass where images are accepted, up to a size in pixels; remote
fetches need an allowed host. The checks read the decoded messages, as the engine does (the
same JSON can spell a key in several ways). URLs that must be refused are loopback spellings on
a closed port: nothing here fetches anything, and nothing would reach outside if it did."""

from __future__ import annotations

import base64
import io
import json

import pytest

from serve_app.guards.media import MediaError, check_media, host_allowed

PNG = "data:image/png;base64,iVBORw0KGgo="


def check(
    body: bytes,
    *,
    accepts_images: bool = True,
    allowed_hosts: tuple[str, ...] = (),
    max_pixels: int = 25_000_000,
) -> None:
    """The engine's check of a body: on its decoded messages."""
    messages = json.loads(body).get("messages")
    check_media(
        messages,
        model_id="m",
        accepts_images=accepts_images,
        allowed_hosts=allowed_hosts,
        max_image_pixels=max_pixels,
    )


def _body(*urls: str) -> bytes:
    parts = [{"type": "text", "text": "Describe."}] + [
        {"type": "image_url", "image_url": {"url": u}} for u in urls
    ]
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": parts}]}).encode()


def test_text_only_requests_pass_everywhere() -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    check(body, accepts_images=False, allowed_hosts=())


def test_data_urls_pass_on_an_image_model() -> None:
    check(_body(PNG, PNG, PNG), accepts_images=True, allowed_hosts=())


def test_images_are_refused_by_a_text_model() -> None:
    with pytest.raises(MediaError, match="does not accept image input"):
        check(_body(PNG), accepts_images=False, allowed_hosts=())


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/latest/meta-data/",
        "http://localhost:9/api/jobs/",
        "http://[::1]:9/x.png",
        "http://0x7f000001:9/x.png",
        "https://127.1:9/x.png",
    ],
)
def test_remote_urls_are_refused_by_default(url: str) -> None:
    with pytest.raises(MediaError, match="not allowed"):
        check(_body(url), accepts_images=True, allowed_hosts=())


def test_remote_urls_of_allowed_hosts_pass() -> None:
    allowed = ("picsum.photos", "images.example.com")
    check(
        _body("https://picsum.photos/id/237/200/300"),
        accepts_images=True,
        allowed_hosts=allowed,
    )
    check(_body("https://IMAGES.example.com/a.png"), accepts_images=True, allowed_hosts=allowed)
    with pytest.raises(MediaError):
        check(
            _body("https://fastly.picsum.photos/a.png"),
            accepts_images=True,
            allowed_hosts=allowed,
        )
    with pytest.raises(MediaError):
        check(_body("https://notpicsum.photos/a.png"), accepts_images=True, allowed_hosts=allowed)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://x/y.png", ""])
def test_other_schemes_are_refused(url: str) -> None:
    with pytest.raises(MediaError):
        check(_body(url), accepts_images=True, allowed_hosts=("x",))


def test_host_allowed_is_exact() -> None:
    assert host_allowed("Example.com.", ("example.com",))
    assert not host_allowed("a.example.com", ("example.com",))
    assert not host_allowed("badexample.com", ("example.com",))


@pytest.mark.parametrize(
    "part",
    [
        {"image_url": {"url": "http://127.0.0.1:9/latest/meta-data"}},  # no "type": vLLM infers it
        {"image_url": "http://127.0.0.1:9/x.png"},
        {"type": "audio_url", "audio_url": {"url": "http://[::1]:9/a.wav"}},
        {"video_url": {"url": "https://localhost:9/v.mp4"}},
    ],
)
def test_every_fetched_media_part_needs_an_allowed_host(part: dict[str, object]) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": [part]}]}).encode()
    with pytest.raises(MediaError, match="not allowed"):
        check(body, accepts_images=True, allowed_hosts=("images.example.com",))


def test_a_key_spelled_with_escapes_is_checked_all_the_same() -> None:
    """`image\\u005furl` is `image_url` once decoded, and vLLM fetches it."""
    body = (
        b'{"messages": [{"role": "user", "content": [{'
        b'"image\\u005furl": {"url": "http://127.0.0.1:9/latest/meta-data/"}}]}]}'
    )
    assert b"_url" not in body
    with pytest.raises(MediaError, match="not allowed"):
        check(body)
    with pytest.raises(MediaError, match="does not accept image input"):
        check(body, accepts_images=False)


def _png(width: int, height: int) -> str:
    from PIL import Image

    out = io.BytesIO()
    Image.new("L", (width, height)).save(out, format="PNG")
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def test_an_image_that_decodes_past_the_pixel_limit_is_refused_from_its_header() -> None:
    bomb = _png(6000, 5000)  # 30 megapixels of zeros: a few tens of KB on the wire
    assert len(bomb) < 200_000
    with pytest.raises(MediaError, match="6000x5000 pixels"):
        check(_body(bomb))
    check(_body(_png(64, 64), PNG))  # small images, and what is not one (vLLM's to report), pass
