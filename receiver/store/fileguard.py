"""Notice a SQLite database file deleted, replaced or made unwritable under a running writer.

SQLite keeps writing to the file it opened: after an ``rm`` (or a restore that moved a
new file into place) commits succeed into an unlinked inode, every acknowledgement is
lost at the next restart, and a new empty database appears at the path for the next
connection. So before each commit the writer compares the path with what it opened.

Files made unwritable (``chattr +i``, a read-only remount) are checked too: SQLite maps
the ``-shm`` file into memory, and writing through that mapping when the file cannot be
written kills the process with SIGBUS, without a log line. A transaction is not begun
nor committed then; the store answers 503 until the files are writable again.
"""

from __future__ import annotations

import logging
import os

from falhook.receiver.errors import StoreUnavailableError

__all__ = ["FileGuard", "FilesUnwritableError"]

log = logging.getLogger("falhook.store")


class FilesUnwritableError(StoreUnavailableError):
    """The database files cannot be written now. Keep the connection open: closing the
    last connection checkpoints through the -shm mapping, which is the SIGBUS."""


class FileGuard:
    """The identity (device, inode) of the database file the writer opened."""

    def __init__(self, path: str | None) -> None:
        # None: an in-memory database, nothing on disk to lose.
        self.path = path if path and path != ":memory:" else None
        self._identity: tuple[int, int] | None = None
        self._gone: str | None = None
        self._files = (
            () if self.path is None else (self.path, self.path + "-wal", self.path + "-shm")
        )
        self._unwritable = False  # logged once per episode

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
        self._check_writable()

    def unwritable(self) -> str | None:
        """Why the database files cannot be written now, or None. Pure: any thread may ask
        (the checkpointer does, before each pass through the -shm mapping)."""
        for name in self._files:
            if not os.access(name, os.W_OK) and os.path.exists(name):
                return (
                    f"the database file {name} is not writable (read-only or immutable): "
                    "refusing to write to it"
                )
        return None

    def _check_writable(self) -> None:
        message = self.unwritable()
        if message is not None:
            if not self._unwritable:
                self._unwritable = True
                log.error("%s", message)
            raise FilesUnwritableError(message)
        if self._unwritable:
            self._unwritable = False
            log.warning("the database files are writable again")
