"""The media archive: every fal media file of an OK delivery, kept in your own storage
before its callbacks run (FALHOOK_ARCHIVE_URL; off when unset).

Modules: media (what a callback sees: `MediaItem`, `MediaState`), urls (the files of a
payload, and their keys), hosts (which hosts may be fetched from), target (the folder or
object storage, through obstore), fetch (one download), rows (the falhook_media table),
archiver (`Archiver`: a delivery's files, with retries and dedupe).

Names load on first use: importing this package imports neither httpx nor obstore.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from falhook.receiver.lazy import lazy_exports as _lazy_exports

if _TYPE_CHECKING:
    from falhook.receiver.archive.archiver import Archiver
    from falhook.receiver.archive.hosts import HostRule
    from falhook.receiver.archive.media import MediaItem, MediaState
    from falhook.receiver.archive.rows import MediaRows
    from falhook.receiver.archive.target import Target
    from falhook.receiver.archive.urls import FoundUrl, find_urls, object_key

_EXPORTS = {
    "Archiver": "archiver",
    "FoundUrl": "urls",
    "HostRule": "hosts",
    "MediaItem": "media",
    "MediaRows": "rows",
    "MediaState": "media",
    "Target": "target",
    "find_urls": "urls",
    "object_key": "urls",
}

__all__ = [
    "Archiver",
    "FoundUrl",
    "HostRule",
    "MediaItem",
    "MediaRows",
    "MediaState",
    "Target",
    "find_urls",
    "object_key",
]

__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals())
