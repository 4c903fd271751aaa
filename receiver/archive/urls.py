"""Which URLs of a payload are files to archive: each http(s) string, by its JSON pointer.

fal's File objects (``{"url": …, "content_type": …, "file_name": …}``) and bare URL strings
alike; ``data:`` URIs carry their bytes already and are left alone.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

__all__ = ["FoundUrl", "find_urls", "object_key"]

_MAX_NAME = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True, slots=True)
class FoundUrl:
    """A URL found in a payload, with what its File object said about it."""

    pointer: str
    url: str
    file_name: str | None = None
    content_type: str | None = None


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")  # RFC 6901


def find_urls(payload: Any) -> list[FoundUrl]:
    """Every http(s) URL string in `payload`, in document order, with its JSON pointer."""
    return list(_walk(payload, ""))


def _walk(value: Any, pointer: str, parent: dict[str, Any] | None = None) -> Iterator[FoundUrl]:
    if isinstance(value, str):
        if value.startswith(("https://", "http://")):
            name = content_type = None
            if parent is not None and pointer.endswith("/url"):
                name = parent.get("file_name") if isinstance(parent.get("file_name"), str) else None
                ctype = parent.get("content_type")
                content_type = ctype if isinstance(ctype, str) else None
            yield FoundUrl(pointer, value, name, content_type)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{pointer}/{_escape(str(key))}", value)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _walk(item, f"{pointer}/{index}")


def _safe(text: str) -> str:
    return _UNSAFE.sub("_", text).strip("._") or "file"


def object_key(prefix: str, request_id: str, found: FoundUrl) -> str:
    """The file's key in the archive: the same for the same (request_id, pointer), so a
    retry, a duplicate or a replay writes the same object; it keeps the file's name and
    extension (``req/images-0-url/cat.png``)."""
    name = posixpath.basename(found.file_name or unquote(urlsplit(found.url).path))
    name = _safe(name)
    if len(name) > _MAX_NAME:
        stem, ext = posixpath.splitext(name)
        name = stem[: _MAX_NAME - len(ext[:16])] + ext[:16]
    where = _safe(found.pointer.strip("/").replace("/", "-")) if found.pointer else "payload"
    parts = [p for p in (prefix.strip("/"), _safe(request_id), where, name) if p]
    return "/".join(parts)
