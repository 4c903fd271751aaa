"""The console's thumbnail rule: which payload URLs the operator's browser fetches."""

from __future__ import annotations

import pytest

from falhook.receiver.console.render import IMG_SRC, find_media, thumbnail


@pytest.mark.parametrize(
    "url",
    ["https://fal.media/files/a.png", "https://v3.fal.media/files/a.png", "https://V3.FAL.MEDIA/a"],
)
def test_https_on_fal_media_is_a_thumbnail(url: str) -> None:
    assert thumbnail(url) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://v3.fal.media/files/a.png",  # not https
        "https://user:pw@v3.fal.media/a.png",  # user info
        "https://v3.fal.media:8443/a.png",  # another port
        "https://evilfal.media/a.png",  # not a subdomain
        "https://fal.media.evil.example/a.png",
        "https://127.0.0.1/a.png",
        "https://v3.fal.media:bad/a.png",  # a port that cannot be read
        "https://evil.example\\.fal.media/a.png",  # a browser's host: evil.example
        "https://evil.example%2f.fal.media/a.png",
    ],
)
def test_anything_else_is_a_plain_link(url: str) -> None:
    assert thumbnail(url) is None


def test_media_found_in_a_body_carry_the_rule() -> None:
    body = {
        "images": [
            {"url": "https://v3.fal.media/x.png", "content_type": "image/png"},
            {"url": "http://cdn.example/y.png", "content_type": "image/png"},
        ],
        "video": {"url": "https://v3.fal.media/z.mp4", "content_type": "video/mp4"},
    }
    shown = {m.url: m.thumbnail for m in find_media(body)}
    assert shown == {
        "https://v3.fal.media/x.png": "https://v3.fal.media/x.png",
        "http://cdn.example/y.png": None,
        "https://v3.fal.media/z.mp4": None,  # not an image
    }
    assert IMG_SRC == "'self' https://fal.media https://*.fal.media"


def test_a_big_body_is_shown_as_its_start_as_received() -> None:
    from falhook.receiver.console.render import body_view

    small = b'{"request_id": "r", "payload": {"url": "https://v3.fal.media/a.png"}}'
    view = body_view(small, limit=1024)
    assert not view.truncated and view.size == view.shown == len(small)
    assert "&#34;request_id&#34;: &#34;r&#34;" in str(view.html) and len(view.media) == 1
    big = b'{"text": "' + "é".encode() * 1000 + b'"}'
    view = body_view(big, limit=1001)  # cuts an é in half
    assert view.truncated and view.size == len(big) and view.shown == 1001
    assert view.media == [] and str(view.html).endswith("\ufffd")
