"""Engines configured for durability (SQLite) and bounded failure (PostgreSQL): every
connection of the store (the writer's, the pool's, the listener's, the store commands')
comes from here, with the same pragmas and connect arguments."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from falhook.receiver.errors import StoreUnavailableError

__all__ = [
    "LOCK_TIMEOUT_MS",
    "NOTIFY_CHANNEL",
    "PG_CONNECT_ARGS",
    "brief",
    "make_engine",
    "pg_options",
    "pooled_connection",
    "sqlite_file",
]

# How long a statement waits for another connection's lock (SQLite busy_timeout,
# PostgreSQL lock_timeout): well inside fal's 15 s, so the answer is a 503, not a hang.
LOCK_TIMEOUT_MS = 5000

# libpq options for every PostgreSQL connection (the pool's, the listener's): a bounded
# connect, and TCP keepalives so a peer that vanished without a FIN/RST (a dead host, a
# cut network path) is noticed in ~20 s instead of the kernel's two hours.
PG_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
}

# NOTIFY'd (PostgreSQL) when deliveries became due: new ones, replayed ones.
NOTIFY_CHANNEL = "falhook_deliveries"


def _sqlite_pragmas(dbapi_conn: Any) -> None:
    cursor = dbapi_conn.cursor()
    # WAL lets readers run beside the writer; synchronous=FULL fsyncs the WAL on every
    # commit, so an acknowledged delivery survives a power loss, not just a crash.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA busy_timeout={LOCK_TIMEOUT_MS}")
    cursor.close()


def pg_options(own: str | Any) -> str:
    """The URL's own ``options`` (a search_path…) plus a lock_timeout: a lock held
    elsewhere (a long admin transaction, LOCK TABLE) fails a statement after
    LOCK_TIMEOUT_MS instead of holding a delivery past fal's 15 s."""
    own = own if isinstance(own, str) else " ".join(own)
    return f"{own} -c lock_timeout={LOCK_TIMEOUT_MS}".strip()


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names; None for PostgreSQL, in-memory or ``file:`` URIs, or
    a URL that does not parse."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return None
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:"):
        return None
    return Path(database)


def brief(exc: BaseException) -> str:
    """The first line of a (driver) error, for messages."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


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
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            _sqlite_pragmas(dbapi_conn)

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
