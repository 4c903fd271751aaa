"""A URL as falhook shows it, without the secrets it may carry.

A forward target (``--forward-to``) may carry credentials in its user info
(``https://app:PASSWORD@host/…``) or its query (``?api_key=…``). The URL itself is used
as given; everywhere it is shown — the startup line, error lines, a delivery's last
error, the console, ``falhook deliveries show`` and the unauthenticated ``/metrics``
labels — it goes through `shown_url` first.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["MASK", "shown_url", "shown_urls_in"]

MASK = "***"
_USERINFO = re.compile(r"://[^/?#]*@")
_ANY_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def shown_url(url: str) -> str:
    """`url` with its user info and each query value replaced by ``***`` (and any
    fragment): scheme, host, port and path stay, enough to tell which target it is."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket: mask by text, cut the query
        return _USERINFO.sub(f"://{MASK}@", url.split("?", 1)[0].split("#", 1)[0])
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rpartition('@')[2]}"
    query = "&".join(_masked_pair(pair) for pair in parts.query.split("&")) if parts.query else ""
    fragment = MASK if parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def shown_urls_in(text: str) -> str:
    """`text` (an error message) with every URL in it shown as `shown_url` shows it."""
    return _ANY_URL.sub(lambda match: shown_url(match.group(0)), text)


def _masked_pair(pair: str) -> str:
    name, sep, value = pair.partition("=")
    if not sep:
        return MASK if name else ""  # a bare ?TOKEN is all value
    return f"{name}={MASK}" if value else f"{name}="
