"""What a callback, the CLI and the console see of an archived file (no SQLAlchemy here)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from falhook.receiver.errors import MediaFailure

__all__ = ["MediaFailure", "MediaItem", "MediaState"]


class MediaState(StrEnum):
    """Where a file of a delivery stands."""

    PENDING = "pending"  # found, not archived yet (or its download was interrupted)
    ARCHIVED = "archived"  # whole in the archive, at stored_url
    FAILED = "failed"  # could not be had for good (404/410, too large, gave up)
    SKIPPED = "skipped"  # not fetched on purpose (host refused)

    @property
    def final(self) -> bool:
        """Nothing more will be tried for it without `falhook media retry`."""
        return self is not MediaState.PENDING


@dataclass(frozen=True, slots=True)
class MediaItem:
    """One file of a delivery: where it came from and where it is kept now."""

    pointer: str
    """The JSON pointer of its URL in the delivery's payload (``/images/0/url``)."""
    source_url: str
    stored_url: str | None
    """``file:///…`` in a folder, ``s3://bucket/key`` (``gs://``, ``az://``) in object storage;
    None until archived."""
    state: MediaState
    error: str | None = None
    sha256: str | None = None
    size: int | None = None
    content_type: str | None = None
