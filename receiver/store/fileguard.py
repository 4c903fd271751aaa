"""Notice a SQLite database file deleted or replaced under a running writer.

SQLite keeps writing to the file it opened: after an ``rm`` (or a restore that moved a
new file into place) commits succeed into an unlinked inode, every acknowledgement is
lost at the next restart, and a new empty database appears at the path for the next
connection. So before each commit the writer compares the path with what it opened.
"""

from __future__ import annotations

import logging
import os

from falhook.receiver.errors import StoreUnavailableError

__all__ = ["FileGuard"]

log = logging.getLogger("falhook.store")


class FileGuard:
    """The identity (device, inode) of the database file the writer opened."""

    def __init__(self, path: str | None) -> None:
        # None: an in-memory database, nothing on disk to lose.
        self.path = path if path and path != ":memory:" else None
        self._identity: tuple[int, int] | None = None
        self._gone: str | None = None

    def opened(self) -> None:
        """The writer's connection is open: remember which file it holds."""
        if self.path is None or self._identity is not None:
            return
        try:
            st = os.stat(self.path)
        except OSError:
            return  # checked again at the next commit
        self._identity = (st.st_dev, st.st_ino)

    def check(self) -> None:
        """Raise StoreUnavailableError if the file at the path is not the one we opened."""
        if self._gone is not None:
            raise StoreUnavailableError(self._gone)
        if self.path is None or self._identity is None:
            return
        try:
            st = os.stat(self.path)
            same = (st.st_dev, st.st_ino) == self._identity
        except FileNotFoundError:
            same = False
        if not same:
            # For good: what was committed since the change is in a file nobody will read.
            self._gone = (
                f"the database file {self.path} was deleted or replaced while open; "
                "refusing to acknowledge into it: restore it and restart falhook"
            )
            log.error("%s", self._gone)
            raise StoreUnavailableError(self._gone)
