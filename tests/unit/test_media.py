"""Image checks: data URLs pass where images are accepted; remote fetches need an allowed host."""

from __future__ import annotations

import json

import pytest

from serve_app.guards.media import MediaError, check_images, host_allowed

PNG = "data:image/png;base64,iVBORw0KGgo="


def _body(*urls: str) -> bytes:
    parts = [{"type": "text", "text": "Describe."}] + [
        {"type": "image_url", "image_url": {"url": u}} for u in urls
    ]
    return json.dumps({"model": "m", "messages": [{"role": "user", "content": parts}]}).encode()


def test_text_only_requests_pass_everywhere() -> None:
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    check_images(body, model_id="m", accepts_images=False, allowed_hosts=())


def test_data_urls_pass_on_an_image_model() -> None:
    check_images(_body(PNG, PNG, PNG), model_id="m", accepts_images=True, allowed_hosts=())


def test_images_are_refused_by_a_text_model() -> None:
    with pytest.raises(MediaError, match="does not accept image input"):
        check_images(_body(PNG), model_id="m", accepts_images=False, allowed_hosts=())


@pytest.mark.parametrize(
    "url",
    [
        "https://picsum.photos/id/237/200/300",
        "http://169.254.169.254/latest/meta-data/",
        "http://localhost:8265/api/jobs/",
        "https://evil.example.com.attacker.net/x.png",
    ],
)
def test_remote_urls_are_refused_by_default(url: str) -> None:
    with pytest.raises(MediaError, match="not allowed"):
        check_images(_body(url), model_id="m", accepts_images=True, allowed_hosts=())


def test_remote_urls_of_allowed_hosts_pass() -> None:
    allowed = ("picsum.photos", "images.example.com")
    check_images(
        _body("https://picsum.photos/id/237/200/300"),
        model_id="m",
        accepts_images=True,
        allowed_hosts=allowed,
    )
    check_images(
        _body("https://IMAGES.example.com/a.png"), model_id="m", accepts_images=True, allowed_hosts=allowed
    )
    with pytest.raises(MediaError):
        check_images(
            _body("https://fastly.picsum.photos/a.png"),
            model_id="m",
            accepts_images=True,
            allowed_hosts=allowed,
        )
    with pytest.raises(MediaError):
        check_images(
            _body("https://notpicsum.photos/a.png"), model_id="m", accepts_images=True, allowed_hosts=allowed
        )


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://x/y.png", ""])
def test_other_schemes_are_refused(url: str) -> None:
    with pytest.raises(MediaError):
        check_images(_body(url), model_id="m", accepts_images=True, allowed_hosts=("x",))


def test_host_allowed_is_exact() -> None:
    assert host_allowed("Example.com.", ("example.com",))
    assert not host_allowed("a.example.com", ("example.com",))
    assert not host_allowed("badexample.com", ("example.com",))


@pytest.mark.parametrize(
    "part",
    [
        {"image_url": {"url": "http://169.254.169.254/latest/meta-data"}},  # no "type": vLLM infers it
        {"image_url": "http://169.254.169.254/x.png"},
        {"type": "audio_url", "audio_url": {"url": "http://10.0.0.1/a.wav"}},
        {"video_url": {"url": "https://internal.example/v.mp4"}},
    ],
)
def test_every_fetched_media_part_needs_an_allowed_host(part: dict[str, object]) -> None:
    body = json.dumps({"messages": [{"role": "user", "content": [part]}]}).encode()
    with pytest.raises(MediaError, match="not allowed"):
        check_images(body, model_id="m", accepts_images=True, allowed_hosts=("images.example.com",))
