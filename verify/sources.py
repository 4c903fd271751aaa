"""Where keys come from: a JWKS fetched over http(s), or a file on this machine.

No crypto here (no PyNaCl): the receiver's settings check a key source at start, and the
store commands load those settings without the signature machinery.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["jwks_file"]

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def jwks_file(source: str) -> Path | None:
    """The local JWKS file a key source names, or None when it is an http(s) URL.

    One rule for `verify_signature` and the receiver (its settings check it at start):
    ``http://`` and ``https://`` are fetched; a path or a ``file://`` URL is a file on this
    machine. Any other scheme raises ValueError, rather than failing later as a strange
    "file not found" (``ftp://host/jwks.json`` read as the path ``ftp:/host/jwks.json``).
    """
    scheme = _SCHEME.match(source)
    if scheme is None:
        return Path(source)
    name = scheme.group(1).lower()
    if name in ("http", "https"):
        return None
    if name != "file":
        raise ValueError("wants an http(s) URL, or a local JWKS file's path or file:// URL")
    return Path(source[scheme.end() :])
