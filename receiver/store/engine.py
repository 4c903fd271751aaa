"""Engines configured for durability (SQLite) and bounded failure (PostgreSQL), and the
connector that lends their pooled connections to sync store calls (admin.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from falhook.receiver.errors import StoreUnavailableError
from falhook.receiver.store.dbapi import (
    LOCK_TIMEOUT_MS,
    PG_CONNECT_ARGS,
    brief,
    pg_options,
    sqlite_file,
    sqlite_pragmas,
)

__all__ = ["EngineConnector", "make_engine", "pooled_connection"]


def make_engine(url: str) -> sa.Engine:
    """An engine configured for durability: WAL + synchronous=FULL on SQLite."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise StoreUnavailableError(f"invalid database URL: {exc}") from exc
    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(
            parsed, connect_args={"timeout": LOCK_TIMEOUT_MS / 1000, "check_same_thread": False}
        )

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            sqlite_pragmas(dbapi_conn)

        path = sqlite_file(url)
        if path is not None:
            _never_recreate(engine, path)
        return engine
    return sa.create_engine(
        parsed,
        pool_pre_ping=True,  # detect connections killed by a restart or pg_terminate_backend
        pool_size=4,
        max_overflow=4,
        pool_timeout=5,
        connect_args={**PG_CONNECT_ARGS, "options": pg_options(parsed.query.get("options", ""))},
    )


def _never_recreate(engine: sa.Engine, path: Path) -> None:
    """Once the engine has opened the file, open it again only if it is still there.

    sqlite3 creates a missing file: after an ``rm`` under a running receiver, the next
    pooled connection (a metrics scrape, the pause watcher) would make an empty database
    at the path, and the store commands would then report "no falhook tables" instead of a
    missing file. ``mode=rw`` opens without creating; the first connection still may.
    """
    uri = f"{path.absolute().as_uri()}?mode=rw"
    opened = False

    @sa.event.listens_for(engine, "connect")
    def _opened(_dbapi_conn: Any, _record: Any) -> None:
        nonlocal opened
        opened = True

    @sa.event.listens_for(engine, "do_connect")
    def _existing_only(_dialect: Any, _record: Any, cargs: list[Any], cparams: Any) -> None:
        if opened:
            cargs[:1] = [uri]
            cparams["uri"] = True


def pooled_connection(engine: sa.Engine) -> Any:
    """A connection from the engine's pool (its pool proxy); StoreUnavailableError if none
    can be had. ``raw_connection()`` passes the driver's own error through unwrapped
    (sqlite3's "unable to open database file" when the file's directory is gone)."""
    try:
        return engine.raw_connection()
    except (sa.exc.SQLAlchemyError, engine.dialect.loaded_dbapi.Error) as exc:
        raise StoreUnavailableError(f"cannot connect: {brief(exc)}") from exc


class EngineConnector:
    """Sync store calls' connections from an engine's pool (dbapi.Connector): `Store`'s,
    and the store commands' for a URL only SQLAlchemy reads (admin.connector_for)."""

    def __init__(self, engine: sa.Engine, *, owns_engine: bool = False) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.errors: tuple[type[BaseException], ...] = (engine.dialect.loaded_dbapi.Error,)
        self._owns_engine = owns_engine

    def connect(self) -> Any:
        return pooled_connection(self.engine)

    def release(self, conn: Any) -> None:
        conn.close()  # back to the pool

    def discard(self, conn: Any) -> None:
        # Never back to the pool: we cannot tell a healthy connection from one the server
        # killed (restart, pg_terminate_backend).
        conn.invalidate()
        conn.close()

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()
