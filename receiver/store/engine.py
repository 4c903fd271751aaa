"""Engines configured for durability (SQLite) and bounded failure (PostgreSQL)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from falhook.receiver.errors import StoreUnavailableError

__all__ = ["LOCK_TIMEOUT_MS", "PG_CONNECT_ARGS", "make_engine", "masked_url", "sqlite_file"]


# How long a statement waits for another connection's lock (SQLite busy_timeout,
# PostgreSQL lock_timeout): well inside fal's 15 s, so the answer is a 503, not a hang.
LOCK_TIMEOUT_MS = 5000

# libpq options for every PostgreSQL connection (the pool's and the listener's): a bounded
# connect, and TCP keepalives so a peer that vanished without a FIN/RST (a dead host, a cut
# network path) is noticed in ~20 s instead of the kernel's two hours.
PG_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
}


def masked_url(url: str) -> str:
    """The URL with its password replaced by ***, for logs."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except sa.exc.ArgumentError:
        return "(unparsable URL)"


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names; None for PostgreSQL, in-memory or ``file:`` URIs."""
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
            cursor = dbapi_conn.cursor()
            # WAL lets readers run beside the writer; synchronous=FULL fsyncs the WAL on
            # every commit, so an acknowledged delivery survives a power loss, not just a crash.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute(f"PRAGMA busy_timeout={LOCK_TIMEOUT_MS}")
            cursor.close()

        return engine
    return sa.create_engine(
        parsed,
        pool_pre_ping=True,  # detect connections killed by a restart or pg_terminate_backend
        pool_size=4,
        max_overflow=4,
        pool_timeout=5,
        connect_args={**PG_CONNECT_ARGS, "options": _pg_options(parsed)},
    )


def _pg_options(url: sa.URL) -> str:
    """The URL's own ``options`` (a search_path…) plus a lock_timeout: a lock held
    elsewhere (a long admin transaction, LOCK TABLE) fails a statement after
    LOCK_TIMEOUT_MS instead of holding a delivery past fal's 15 s."""
    own = url.query.get("options", "")
    own = own if isinstance(own, str) else " ".join(own)
    return f"{own} -c lock_timeout={LOCK_TIMEOUT_MS}".strip()
