"""Readiness of the store: could a delivery be stored now?

`/readyz` asks `StoreProbe.check`. A probe is a write through the writer (a commit, so a
store that cannot commit fails it, within `PROBE_TIMEOUT`) and, for a SQLite file, room on
its filesystem for a small delivery: a full disk can still take a one-page write (SQLite
reuses its WAL) while every delivery gets 503, so free space is what tells. The verdict is
kept for `CHECK_SECONDS`, and concurrent probes share one check: a load balancer polling
often costs one write every few seconds. Only the store's state counts, never a
delivery's content: one that could not be stored (for what it held) does not make the
replica unready.
"""

from __future__ import annotations

import asyncio
import os
import time

from falhook.receiver.errors import StoreUnavailableError
from falhook.receiver.store import Store

__all__ = ["CHECK_SECONDS", "MIN_FREE_BYTES", "PROBE_TIMEOUT", "StoreProbe"]

CHECK_SECONDS = 2.0  # how long a verdict is kept
PROBE_TIMEOUT = 1.5  # a probe must answer quickly, even when the store waits on a lock
# Room a small delivery needs in a SQLite file's filesystem: its row, body and index
# pages written to the WAL (about 16 pages of 4 KiB), rounded up.
MIN_FREE_BYTES = 64 * 1024


class StoreProbe:
    """Whether `store` could take a delivery now; checked at most every `every` seconds."""

    def __init__(
        self,
        store: Store,
        *,
        every: float = CHECK_SECONDS,
        timeout: float = PROBE_TIMEOUT,
        min_free: int = MIN_FREE_BYTES,
    ) -> None:
        self.store = store
        self._every = every
        self._timeout = timeout
        self._min_free = min_free
        database = store.engine.url.database if store.dialect == "sqlite" else None
        in_memory = not database or database == ":memory:" or database.startswith("file::memory:")
        self._directory = None if in_memory else os.path.dirname(os.path.abspath(database or ""))
        self._checked_at = float("-inf")
        self._error: StoreUnavailableError | None = None
        self._probing: asyncio.Future[None] | None = None

    async def check(self) -> None:
        """Raise StoreUnavailableError unless the last verdict (at most `every` old) was
        that a delivery could be stored."""
        if time.monotonic() - self._checked_at >= self._every:
            if self._probing is None:
                self._probing = asyncio.ensure_future(self._probe())
            # Shielded: a caller that goes away does not cancel the others' probe.
            await asyncio.shield(self._probing)
        if self._error is not None:
            raise self._error

    async def _probe(self) -> None:
        try:
            self._error = await self._verdict()
            self._checked_at = time.monotonic()
        finally:
            self._probing = None

    async def _verdict(self) -> StoreUnavailableError | None:
        if self._directory is not None:
            try:
                st = os.statvfs(self._directory)
            except OSError as exc:
                return StoreUnavailableError(f"cannot look at {self._directory}: {exc}")
            free = st.f_bavail * st.f_frsize
            if free < self._min_free:
                return StoreUnavailableError(
                    f"the filesystem of the database has {free} bytes free, less than a "
                    "delivery needs"
                )
        try:
            async with asyncio.timeout(self._timeout):
                await self.store.ping()  # a commit: a store that cannot commit fails it
        except TimeoutError:
            return StoreUnavailableError(f"no answer within {self._timeout:g} s")
        except StoreUnavailableError as exc:
            return exc
        return None
