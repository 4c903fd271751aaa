"""The falhook_media table's queries: SQLAlchemy Core on `MediaRow`, each call in a
transaction of its own on a pooled connection (never on the hot path: a delivery's files
are recorded while its attempt runs, after it was acknowledged)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from falhook.receiver.archive.media import MediaItem, MediaState
from falhook.receiver.errors import StoreUnavailableError
from falhook.receiver.models import MediaPurgeRow, MediaRow

__all__ = ["MediaCounts", "MediaRows"]

_T = TypeVar("_T")
MEDIA: sa.Table = MediaRow.__table__  # type: ignore[attr-defined]
PURGES: sa.Table = MediaPurgeRow.__table__  # type: ignore[attr-defined]
_ITEM_COLUMNS = (
    "pointer",
    "source_url",
    "stored_url",
    "state",
    "error",
    "sha256",
    "size",
    "content_type",
)


def _item(row: Any) -> MediaItem:
    return MediaItem(
        pointer=row.pointer,
        source_url=row.source_url,
        stored_url=row.stored_url,
        state=MediaState(row.state),
        error=row.error,
        sha256=row.sha256,
        size=row.size,
        content_type=row.content_type,
    )


@dataclass(frozen=True, slots=True)
class MediaCounts:
    """Files in each state, and the oldest pending file's age in seconds (0 if none)."""

    states: dict[MediaState, int]
    oldest_pending_age: float


class MediaRows:
    """The media rows of one store (its SQLAlchemy engine)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    def _run(self, work: Callable[[sa.Connection], _T]) -> _T:
        try:
            with self.engine.begin() as conn:
                return work(conn)
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailableError(f"media rows: {exc.__class__.__name__}: {exc}") from exc

    async def _arun(self, work: Callable[[sa.Connection], _T]) -> _T:
        return await asyncio.to_thread(self._run, work)

    # -- what the archiver does --------------------------------------------------------

    async def ensure(
        self, request_id: str, found: Sequence[tuple[str, str]]
    ) -> dict[str, MediaItem]:
        """Record each (pointer, source URL) not recorded yet as pending; every row of the
        delivery, by pointer (a duplicate or a replay finds the rows of the first)."""
        now = time.time()
        values = [
            {
                "request_id": request_id,
                "pointer": pointer,
                "source_url": url,
                "state": MediaState.PENDING.value,
                "attempts": 0,
                "created_at": now,
                "updated_at": now,
            }
            for pointer, url in found
        ]

        def work(conn: sa.Connection) -> dict[str, MediaItem]:
            if values:
                insert = (postgresql if conn.dialect.name == "postgresql" else sqlite).insert
                conn.execute(insert(MEDIA).on_conflict_do_nothing(), values)
            return {item.pointer: item for item in _select(conn, request_id)}

        return await self._arun(work)

    async def record(
        self,
        request_id: str,
        pointer: str,
        state: MediaState,
        *,
        tries: int,
        error: str | None = None,
        stored_url: str | None = None,
        sha256: str | None = None,
        size: int | None = None,
        content_type: str | None = None,
    ) -> None:
        """Write a file's outcome after `tries` more downloads."""
        now = time.time()
        statement = (
            MEDIA.update()
            .where(MEDIA.c.request_id == request_id, MEDIA.c.pointer == pointer)
            .values(
                state=state.value,
                error=error,
                stored_url=stored_url,
                sha256=sha256,
                size=size,
                content_type=content_type,
                attempts=MEDIA.c.attempts + tries,
                updated_at=now,
                finished_at=now if state.final else None,
            )
        )
        await self._arun(lambda conn: conn.execute(statement))

    async def items(self, request_id: str) -> list[MediaItem]:
        """A delivery's files, in payload order."""
        return await self._arun(lambda conn: _select(conn, request_id))

    async def purge_state(self, request_id: str) -> str | None:
        """``purged`` or ``failed`` once a purge at fal was tried for the delivery."""
        query = sa.select(PURGES.c.state).where(PURGES.c.request_id == request_id)
        return await self._arun(lambda conn: conn.execute(query).scalar())

    async def record_purge(
        self, request_id: str, state: str, *, status_code: int | None, error: str | None
    ) -> None:
        """Write a purge's outcome (one row per delivery, its attempts counted)."""
        now = time.time()

        def work(conn: sa.Connection) -> None:
            changed = conn.execute(
                PURGES.update()
                .where(PURGES.c.request_id == request_id)
                .values(
                    state=state,
                    status_code=status_code,
                    error=error,
                    attempts=PURGES.c.attempts + 1,
                    updated_at=now,
                )
            ).rowcount
            if not changed:
                conn.execute(
                    PURGES.insert().values(
                        request_id=request_id,
                        state=state,
                        status_code=status_code,
                        error=error,
                        attempts=1,
                        updated_at=now,
                    )
                )

        await self._arun(work)

    def purge(self, request_id: str) -> tuple[str, str | None] | None:
        """(state, error) of the delivery's purge at fal, or None if none was tried."""
        query = sa.select(PURGES.c.state, PURGES.c.error).where(PURGES.c.request_id == request_id)

        def work(conn: sa.Connection) -> tuple[str, str | None] | None:
            row = conn.execute(query).first()
            return None if row is None else (row[0], row[1])

        return self._run(work)

    # -- what operators do (CLI, console, metrics) -------------------------------------

    def find(
        self,
        *,
        request_id: str | None = None,
        state: MediaState | None = None,
        limit: int | None = 100,
    ) -> list[tuple[str, MediaItem]]:
        """(request_id, item) pairs, newest first."""
        query = sa.select(MEDIA.c.request_id, *(MEDIA.c[name] for name in _ITEM_COLUMNS))
        if request_id is not None:
            query = query.where(MEDIA.c.request_id == request_id)
        if state is not None:
            query = query.where(MEDIA.c.state == state.value)
        query = query.order_by(MEDIA.c.created_at.desc(), MEDIA.c.request_id, MEDIA.c.pointer)
        if limit is not None:
            query = query.limit(limit)
        return self._run(lambda conn: [(r.request_id, _item(r)) for r in conn.execute(query)])

    def get(self, request_id: str) -> list[MediaItem]:
        """A delivery's files (sync)."""
        return self._run(lambda conn: _select(conn, request_id))

    def retry(self, request_id: str) -> int:
        """Put a delivery's failed and skipped files back to pending; how many."""
        statement = (
            MEDIA.update()
            .where(
                MEDIA.c.request_id == request_id,
                MEDIA.c.state.in_([MediaState.FAILED.value, MediaState.SKIPPED.value]),
            )
            .values(state=MediaState.PENDING.value, updated_at=time.time(), finished_at=None)
        )
        return self._run(lambda conn: conn.execute(statement).rowcount)

    def counts(self, now: float | None = None) -> MediaCounts:
        """Files in each state and the oldest pending one's age (the metrics' gauges)."""

        def work(conn: sa.Connection) -> MediaCounts:
            states = dict.fromkeys(MediaState, 0)
            counted = sa.select(MEDIA.c.state, sa.func.count()).group_by(MEDIA.c.state)
            for state, count in conn.execute(counted):
                states[MediaState(state)] = int(count)
            oldest = conn.execute(
                sa.select(sa.func.min(MEDIA.c.created_at)).where(
                    MEDIA.c.state == MediaState.PENDING.value
                )
            ).scalar()
            age = 0.0 if oldest is None else max(0.0, (now or time.time()) - float(oldest))
            return MediaCounts(states, age)

        return self._run(work)


def _select(conn: sa.Connection, request_id: str) -> list[MediaItem]:
    query = sa.select(*(MEDIA.c[name] for name in _ITEM_COLUMNS)).where(
        MEDIA.c.request_id == request_id
    )
    rows = [_item(row) for row in conn.execute(query)]
    return sorted(rows, key=lambda item: _order(item.pointer))


def _order(pointer: str) -> list[tuple[int, Any]]:
    # Payload order: /images/10 after /images/2.
    return [(0, int(t)) if t.isdigit() else (1, t) for t in pointer.split("/")]
