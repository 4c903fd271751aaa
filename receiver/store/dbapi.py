"""The store on a driver's own connection (sqlite3, psycopg), without SQLAlchemy.

Why: importing SQLAlchemy costs ~0.2 s, SQLModel and pydantic as much again, and the store
commands (`falhook deliveries list`, `prune`, `dispatch status`…) run a query or two. So
the operator queries (admin.py, attempts.py, control.py, expectations.py) are plain SQL on
a DBAPI cursor, and the commands open that cursor straight from the driver
(`DirectConnector`); `falhook serve` runs the very same queries on connections from its
SQLAlchemy engine's pool (engine.EngineConnector).

What both ways of connecting must agree on lives here, and engine.py imports it: the URL's
grammar (SQLAlchemy's), the SQLite pragmas, the PostgreSQL connect arguments.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote

from falhook.receiver.errors import StoreUnavailableError

__all__ = [
    "LOCK_TIMEOUT_MS",
    "NOTIFY_CHANNEL",
    "PG_CONNECT_ARGS",
    "Connector",
    "DatabaseUrl",
    "Db",
    "DirectConnector",
    "Op",
    "Tx",
    "brief",
    "parse_url",
    "pg_options",
    "placeholders",
    "sql_for",
    "sqlite_file",
    "sqlite_pragmas",
]

# How long a statement waits for another connection's lock (SQLite busy_timeout,
# PostgreSQL lock_timeout): well inside fal's 15 s, so the answer is a 503, not a hang.
LOCK_TIMEOUT_MS = 5000

# libpq options for every PostgreSQL connection (the pool's, the listener's, the CLI's): a
# bounded connect, and TCP keepalives so a peer that vanished without a FIN/RST (a dead
# host, a cut network path) is noticed in ~20 s instead of the kernel's two hours.
PG_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
}

# NOTIFY'd (PostgreSQL) when deliveries became due: new ones, replayed ones.
NOTIFY_CHANNEL = "falhook_deliveries"


def sqlite_pragmas(dbapi_conn: Any) -> None:
    """Set up a new SQLite connection: every connection, the writer's and the CLI's."""
    cursor = dbapi_conn.cursor()
    # WAL lets readers run beside the writer; synchronous=FULL fsyncs the WAL on every
    # commit, so an acknowledged delivery survives a power loss, not just a crash.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA busy_timeout={LOCK_TIMEOUT_MS}")
    cursor.close()


def pg_options(own: str | Sequence[str]) -> str:
    """The URL's own ``options`` (a search_path…) plus a lock_timeout: a lock held
    elsewhere (a long admin transaction, LOCK TABLE) fails a statement after
    LOCK_TIMEOUT_MS instead of holding a delivery past fal's 15 s."""
    own = own if isinstance(own, str) else " ".join(own)
    return f"{own} -c lock_timeout={LOCK_TIMEOUT_MS}".strip()


# -- URLs ------------------------------------------------------------------------------

# SQLAlchemy's own URL grammar (sqlalchemy/engine/url.py, _parse_url), so that a URL means
# the same here as in `falhook serve`; tests/receiver/test_dbapi.py compares the two.
_URL = re.compile(
    r"""
        (?P<name>[\w\+]+)://
        (?:
            (?P<username>[^:/]*)
            (?::(?P<password>[^@]*))?
        @)?
        (?:
            (?:
                \[(?P<ipv6host>[^/\?]+)\] |
                (?P<ipv4host>[^/:\?]+)
            )?
            (?::(?P<port>[^/\?]*))?
        )?
        (?:/(?P<database>[^\?]*))?
        (?:\?(?P<query>.*))?
    """,
    re.X,
)


@dataclass(frozen=True)
class DatabaseUrl:
    """A database URL's parts, as SQLAlchemy reads them."""

    backend: str  # "sqlite", "postgresql"
    driver: str | None  # "psycopg", "pysqlite", or None (the backend's default)
    username: str | None = None
    password: str | None = None
    host: str | None = None
    port: int | None = None
    database: str | None = None
    query: dict[str, str | list[str]] = field(default_factory=dict)


def parse_url(url: str) -> DatabaseUrl:
    """Read a database URL like SQLAlchemy's ``make_url``; ValueError if it cannot."""
    found = _URL.match(url)
    if found is None:
        raise ValueError("Could not parse SQLAlchemy URL from given URL string")
    parts = found.groupdict()
    query: dict[str, str | list[str]] = {}
    for key, value in parse_qsl(parts["query"] or ""):
        if key in query:
            previous = query[key]
            query[key] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            query[key] = value
    backend, _, driver = parts["name"].partition("+")
    return DatabaseUrl(
        backend=backend,
        driver=driver or None,
        username=_unquoted(parts["username"]),
        password=_unquoted(parts["password"]),
        host=parts["ipv4host"] or parts["ipv6host"],
        port=int(parts["port"]) if parts["port"] else None,
        database=_unquoted(parts["database"]),
        query=query,
    )


def _unquoted(text: str | None) -> str | None:
    return unquote(text) if text is not None else None


def sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names; None for PostgreSQL, in-memory or ``file:`` URIs."""
    try:
        parsed = parse_url(url)
    except ValueError:
        return None
    database = parsed.database
    if parsed.backend != "sqlite" or not database or database == ":memory:":
        return None
    if database.startswith("file:"):
        return None
    return Path(database)


# -- plain SQL on either driver ----------------------------------------------------------


def sql_for(text: str, dialect: str) -> str:
    """`text` written with "?" placeholders, for the dialect's driver: sqlite3 takes "?",
    psycopg "%s". (No statement of falhook's holds a literal "?" or "%".)"""
    return text if dialect == "sqlite" else text.replace("?", "%s")


class Db:
    """One transaction's DBAPI cursor and its dialect: what the operator queries run on."""

    __slots__ = ("cur", "dialect")

    def __init__(self, cur: Any, dialect: str) -> None:
        self.cur = cur
        self.dialect = dialect

    def execute(self, text: str, params: Sequence[Any] = ()) -> Any:
        """Run `text` (with "?" placeholders) and return the cursor, to fetch from."""
        self.cur.execute(sql_for(text, self.dialect), tuple(params))
        return self.cur


def placeholders(count: int) -> str:
    """``?, ?, ?`` for an IN list of `count` values."""
    return ", ".join("?" * count)


class Tx:
    """One transaction as its operations see it: the cursor, the statements, and whether
    an operation made work due. Each transaction gets a fresh one.

    The writers (writer.py) make one per batch; a sync caller makes one with no statements
    (`Admin.run_sync`), for operations written in plain SQL (expectations.py).
    """

    __slots__ = ("cur", "due_now", "sql")

    def __init__(self, cur: Any, sql: Any) -> None:
        self.cur = cur
        self.sql = sql
        # An operation made work due now (a new insert, a revived dead delivery): only such
        # a transaction NOTIFYs the other replicas and wakes the local dispatcher. A NOTIFY
        # on every transaction (claims included) would make idle replicas wake each other.
        self.due_now = False


# An operation: runs inside a transaction and returns its request's result.
Op = Callable[[Tx], Any]


def brief(exc: BaseException) -> str:
    """The first line of a (driver) error, for messages."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# -- connecting --------------------------------------------------------------------------


class Connector(Protocol):
    """Where sync store calls get a DBAPI connection: straight from the driver
    (`DirectConnector`, the CLI) or from an engine's pool (engine.EngineConnector)."""

    dialect: str
    errors: tuple[type[BaseException], ...]  # what the driver raises (to report, one line)

    def connect(self) -> Any:
        """A DBAPI connection; StoreUnavailableError ("cannot connect: …") if none."""
        ...

    def release(self, conn: Any) -> None:
        """Done with `conn`, its transaction ended (committed or rolled back)."""
        ...

    def discard(self, conn: Any) -> None:
        """`conn` failed: never use it again."""
        ...

    def close(self) -> None:
        """Close what this connector holds."""
        ...


class DirectConnector:
    """One connection straight from the driver, opened on first use and kept until
    `close` (the CLI runs a query or two): no SQLAlchemy, no pool.

    `for_url` returns None for a URL it would not open exactly as `falhook serve` does
    (query options on SQLite, several PostgreSQL hosts, another driver…): those go
    through SQLAlchemy (`admin.connector_for`).
    """

    def __init__(self, dialect: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.dialect = dialect
        self.args = args
        self.kwargs = kwargs
        if dialect == "sqlite":
            import sqlite3

            self.errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
        else:
            import psycopg  # the postgres extra

            self.errors = (psycopg.Error,)
        self._conn: Any = None

    @classmethod
    def for_url(cls, url: str) -> DirectConnector | None:
        """A connector opening `url` with the arguments SQLAlchemy would pass its driver
        (plus falhook's engine options), or None when that needs SQLAlchemy itself."""
        try:
            parsed = parse_url(url)
        except ValueError:
            return None
        if parsed.backend == "sqlite":
            return cls._sqlite(parsed)
        if parsed.backend == "postgresql" and parsed.driver == "psycopg":
            return cls._postgresql(parsed)
        return None

    @classmethod
    def _sqlite(cls, url: DatabaseUrl) -> DirectConnector | None:
        database = url.database
        if url.driver not in (None, "pysqlite") or url.query:
            return None  # driver options or a SQLite URI: as SQLAlchemy reads them
        if url.username or url.password or url.host or url.port:
            return None  # SQLAlchemy refuses these; let it say so
        if not database or database == ":memory:" or database.startswith("file:"):
            return None
        kwargs = {"timeout": LOCK_TIMEOUT_MS / 1000, "check_same_thread": False}
        return cls("sqlite", (os.path.abspath(database),), kwargs)

    @classmethod
    def _postgresql(cls, url: DatabaseUrl) -> DirectConnector | None:
        query = url.query
        if "host" in query or any(isinstance(v, list) for v in query.values()):
            return None  # several hosts, or a repeated option: as SQLAlchemy reads them
        # What SQLAlchemy's psycopg dialect passes (translate_connect_args: only the parts
        # given), then the URL's query, then make_engine's connect_args over both.
        kwargs: dict[str, Any] = {
            name: value
            for name, value in (
                ("host", url.host),
                ("dbname", url.database),
                ("user", url.username),
                ("password", url.password),
                ("port", url.port),
            )
            if value
        }
        kwargs.update(query)
        kwargs.update(PG_CONNECT_ARGS)
        kwargs["options"] = pg_options(query.get("options", ""))
        return cls("postgresql", (), kwargs)

    def connect(self) -> Any:
        if self._conn is None:
            try:
                self._conn = self._open()
            except self.errors as exc:
                raise StoreUnavailableError(f"cannot connect: {brief(exc)}") from exc
        return self._conn

    def _open(self) -> Any:
        if self.dialect == "sqlite":
            import sqlite3

            conn = sqlite3.connect(*self.args, **self.kwargs)
            try:
                sqlite_pragmas(conn)
            except BaseException:
                conn.close()
                raise
            return conn
        import psycopg

        return psycopg.connect(*self.args, **self.kwargs)

    def release(self, conn: Any) -> None:
        """Kept for the next call (its transaction ended)."""

    def discard(self, conn: Any) -> None:
        if conn is self._conn:
            self._conn = None
        with contextlib.suppress(*self.errors):  # it failed already; closing is all that is left
            conn.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
