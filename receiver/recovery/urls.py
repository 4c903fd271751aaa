"""fal's queue URLs for an endpoint and a request.

Submit goes to the full endpoint id (``{queue}/fal-ai/flux/dev``); status and result live
under the endpoint's owner/app only (``{queue}/fal-ai/flux/requests/{id}/status``), split
the way fal-js ``parseEndpointId`` splits it: a legacy ``123-app`` id is ``123/app``, and a
``workflows/`` or ``comfy/`` namespace stays in front. The URLs fal returns at submit are
preferred whenever they are known; these are built only when they are not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

__all__ = ["EndpointId", "RequestUrls", "parse_endpoint_id", "request_urls", "same_origin"]

_NAMESPACES = ("workflows", "comfy")
_LEGACY_APP_ID = re.compile(r"^([0-9]+)-([a-zA-Z0-9-]+)$")
# What an endpoint id is made of (owner, app and path segments); anything else (a query,
# a fragment, "..", spaces) would change which URL is called.
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._~-]*$")


@dataclass(frozen=True, slots=True)
class EndpointId:
    """An endpoint id split like fal-js ``parseEndpointId``."""

    owner: str
    alias: str
    path: str | None = None
    namespace: str | None = None

    @property
    def app(self) -> str:
        """``[namespace/]owner/alias``: what status and result URLs are built from."""
        prefix = f"{self.namespace}/" if self.namespace else ""
        return f"{prefix}{self.owner}/{self.alias}"

    @property
    def full(self) -> str:
        """The whole id, as submitted."""
        return self.app + (f"/{self.path}" if self.path else "")


def parse_endpoint_id(endpoint_id: str) -> EndpointId:
    """``fal-ai/flux/dev`` → owner ``fal-ai``, alias ``flux``, path ``dev``.

    Raises ValueError (with a message fit for a user) for anything else.
    """
    text = endpoint_id.strip().strip("/")
    parts = text.split("/")
    if len(parts) == 1:
        legacy = _LEGACY_APP_ID.match(text)
        if legacy is None:
            raise ValueError(
                f"{endpoint_id!r} is not a fal endpoint id: use owner/app[/path], "
                "e.g. fal-ai/flux/dev"
            )
        parts = [legacy.group(1), legacy.group(2)]
    if not all(_SEGMENT.match(part) for part in parts):
        raise ValueError(
            f"{endpoint_id!r} is not a fal endpoint id: each part of owner/app[/path] is "
            "letters, digits, '.', '_', '~' or '-'"
        )
    if parts[0] in _NAMESPACES and len(parts) >= 3:
        return EndpointId(parts[1], parts[2], "/".join(parts[3:]) or None, parts[0])
    return EndpointId(parts[0], parts[1], "/".join(parts[2:]) or None)


@dataclass(frozen=True, slots=True)
class RequestUrls:
    status_url: str
    response_url: str


def request_urls(queue_url: str, endpoint_id: str, request_id: str) -> RequestUrls:
    """The status and result URLs of a request, from the endpoint's owner/app only."""
    base = f"{queue_url.rstrip('/')}/{parse_endpoint_id(endpoint_id).app}"
    request = f"{base}/requests/{quote(request_id, safe='')}"
    return RequestUrls(status_url=f"{request}/status", response_url=request)


def submit_url(queue_url: str, endpoint_id: str) -> str:
    """Where a request to ``endpoint_id`` is submitted (the full id, path included)."""
    return f"{queue_url.rstrip('/')}/{parse_endpoint_id(endpoint_id).full}"


def same_origin(url: str, queue_url: str) -> bool:
    """True if `url` is on fal's queue host: only there is the fal key ever sent."""
    a, b = urlsplit(url), urlsplit(queue_url)
    return (a.scheme, a.netloc) == (b.scheme, b.netloc) and a.scheme in ("http", "https")
