"""Turning stored data into what the pages show: times, the pretty body, media links.

Everything here returns plain text; the templates escape it (autoescape is on). The one
exception is `linked_body`, which builds markup itself, escaping every piece it emits.
A payload is attacker-influenced text: only http(s) URLs ever become links, and only
`thumbnail` decides which become images the operator's browser fetches by itself.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from markupsafe import Markup, escape

__all__ = [
    "IMG_SRC",
    "MAX_SHOWN_BYTES",
    "THUMBNAIL_HOSTS",
    "BodyView",
    "Media",
    "body_view",
    "find_media",
    "linked_body",
    "one_line",
    "path_segment",
    "pretty_body",
    "size",
    "thumbnail",
    "utc",
]

# Where a payload's image may be shown as a thumbnail: fal's media hosts (and their
# subdomains, v3.fal.media…), over https. Any other URL a payload names is a plain link,
# so opening a delivery makes the browser contact no host the payload chose.
THUMBNAIL_HOSTS = ("fal.media",)
# The console's CSP img-src: the same hosts, so the browser enforces the rule too.
IMG_SRC = " ".join(["'self'", *(f"https://{host} https://*.{host}" for host in THUMBNAIL_HOSTS)])
# The most of a body the delivery page shows (pretty-printed, its URLs links, its media
# listed): making the page of a bigger one took seconds of CPU. A bigger body is shown as
# its first part, as received, with a link to the whole of it.
MAX_SHOWN_BYTES = 256 * 1024
_HOSTNAME = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".avif", ".bmp")
_MAX_MEDIA = 50
_URL = re.compile(r"https?://[^\s\"'<>\\]+")


def utc(ts: float | None) -> str:
    """``2026-12-01 10:00:00`` (UTC), or an em dash for none."""
    if ts is None:
        return "—"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def path_segment(request_id: str) -> str:
    """A request id as one URL path segment: fal's ids are UUIDs, but any stored id must
    open (``a?b#c``, ``50%``, ``../x``: Starlette's url_for quotes nothing)."""
    return quote(request_id, safe="")


def one_line(text: str | None, width: int = 120) -> str:
    if not text:
        return ""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def size(n: int) -> str:
    """A byte count for people: 812 bytes, 256 KiB, 15.3 MiB."""
    if n < 1024:
        return f"{n} bytes"
    if n < 1024 * 1024:
        return f"{n / 1024:.0f} KiB"
    return f"{n / 1024 / 1024:.1f} MiB"


def age(seconds: float) -> str:
    """A short age: 0s, 42s, 5m 3s, 2h 10m, 3d 4h."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def parse_body(body: bytes) -> Any:
    """The stored body as JSON, or None if it is not JSON."""
    try:
        return json.loads(body)
    except ValueError:
        return None


def pretty_body(body: bytes, parsed: Any) -> str:
    """Indented JSON (fal's > 2**53 integers stay exact), else the text as received."""
    if parsed is None:
        return body.decode("utf-8", errors="replace")
    return json.dumps(parsed, indent=2, ensure_ascii=False)


def _http_url(text: str) -> str | None:
    try:
        parts = urlsplit(text)
    except ValueError:
        return None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return None
    return text


def linked_body(text: str) -> Markup:
    """`text` escaped, with each http(s) URL in it made a link (and nothing else)."""
    out: list[str] = []
    last = 0
    for match in _URL.finditer(text):
        url = _http_url(match.group(0))
        if url is None:
            continue
        out.append(str(escape(text[last : match.start()])))
        href = escape(url)
        out.append(
            f'<a href="{href}" rel="noopener noreferrer nofollow" target="_blank">{href}</a>'
        )
        last = match.end()
    out.append(str(escape(text[last:])))
    return Markup("".join(out))


def thumbnail(url: str) -> str | None:
    """The image source to show for the image at `url`, or None for a plain link.

    The one rule for what the operator's browser fetches by itself: https on one of
    `THUMBNAIL_HOSTS`, on the default port, with no user info.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    if parts.scheme.lower() != "https" or "@" in parts.netloc or port not in (None, 443):
        return None
    if not _HOSTNAME.fullmatch(host):
        return None  # e.g. "evil.example\.fal.media": a browser reads "\" as "/"
    if not any(host == h or host.endswith("." + h) for h in THUMBNAIL_HOSTS):
        return None
    return url


@dataclass(frozen=True, slots=True)
class Media:
    path: str  # where in the body: payload.images[0].url
    url: str
    thumbnail: str | None  # the image's source when it is shown (see `thumbnail`)


def find_media(parsed: Any) -> list[Media]:
    """Every http(s) URL in the body (fal's File objects and plain URL fields)."""
    found: list[Media] = []

    def walk(value: Any, path: str, siblings: dict[str, Any] | None) -> None:
        if len(found) >= _MAX_MEDIA:
            return
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}.{key}" if path else str(key), value)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]", None)
        elif isinstance(value, str) and (url := _http_url(value)) is not None:
            content_type = str((siblings or {}).get("content_type") or "")
            image = content_type.startswith("image/") or (
                not content_type and urlsplit(url).path.lower().endswith(_IMAGE_SUFFIXES)
            )
            found.append(Media(path, url, thumbnail(url) if image else None))

    walk(parsed, "", None)
    return found


@dataclass(frozen=True, slots=True)
class BodyView:
    """What the delivery page shows of a body."""

    html: Markup  # the body (or its first `shown` bytes), escaped, URLs linked
    media: list[Media]
    size: int  # the whole body's bytes
    shown: int  # how many of them are shown

    @property
    def truncated(self) -> bool:
        return self.shown < self.size


def body_view(body: bytes, limit: int = MAX_SHOWN_BYTES) -> BodyView:
    """The page's view of `body`: whole and pretty up to `limit` bytes; beyond, its first
    `limit` bytes as received (not parsed, no media list). CPU-bound: the page runs it in
    a thread, and the bound keeps what it holds the GIL for short."""
    if len(body) > limit:
        text = body[:limit].decode("utf-8", errors="replace")  # a cut character: one �
        return BodyView(linked_body(text), [], len(body), limit)
    parsed = parse_body(body)
    html = linked_body(pretty_body(body, parsed))
    return BodyView(html, find_media(parsed), len(body), len(body))
