"""The store commands' own connections (store/dbapi.py) open a URL exactly as `falhook
serve`'s SQLAlchemy engine does, or leave it to SQLAlchemy."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from falhook.receiver.errors import StoreUnavailableError
from falhook.receiver.state import State
from falhook.receiver.store import Store
from falhook.receiver.store.admin import Admin
from falhook.receiver.store.dbapi import DirectConnector, parse_url, sqlite_file
from falhook.receiver.store.engine import EngineConnector, make_engine
from falhook.receiver.store.migrations import MIGRATIONS
from falhook.receiver.store.schema import SCHEMA_VERSION
from falhook.receiver.store.writer import Connection
from tests.receiver import store_fixtures
from tests.receiver.store_fixtures import delivery

pg_schema_url = store_fixtures.pg_schema_url
store_url = store_fixtures.store_url

DIRECT = [
    "sqlite:///falhook.db",
    "sqlite:////var/lib/falhook/falhook.db",
    "sqlite+pysqlite:///./data/falhook.db",
    "sqlite:///with%20space.db",
    "postgresql+psycopg://falhook@127.0.0.1/falhook",
    "postgresql+psycopg://falhook:p%40ss%2Fw0rd@db.internal:6543/falhook?sslmode=disable",
    "postgresql+psycopg://u@[::1]:5432/db?options=-csearch_path%3Dfalhook",
    "postgresql+psycopg://u@h/db?application_name=falhook&options=-c%20statement_timeout%3D1000",
    "postgresql+psycopg:///falhook",
]
THROUGH_SQLALCHEMY = [
    "sqlite:///falhook.db?timeout=2",  # driver options
    "sqlite:///file:falhook.db?mode=ro&uri=true",  # a SQLite URI
    "sqlite://",  # in memory
    "sqlite:///:memory:",
    "postgresql://u@h/db",  # psycopg2
    "postgresql+psycopg://u@h/db?host=a&host=b",  # several hosts
    "mysql://u@h/db",
]


@pytest.mark.parametrize("url", DIRECT + THROUGH_SQLALCHEMY)
def test_urls_are_read_as_sqlalchemy_reads_them(url: str) -> None:
    ours, theirs = parse_url(url), sa.make_url(url)
    assert ours.backend == theirs.get_backend_name()
    assert (ours.driver or None) == (theirs.drivername.partition("+")[2] or None)
    assert (ours.username, ours.password, ours.host, ours.port, ours.database) == (
        theirs.username,
        theirs.password,
        theirs.host,
        theirs.port,
        theirs.database,
    )
    assert ours.query == {
        k: list(v) if isinstance(v, tuple) else v for k, v in theirs.query.items()
    }


class _StopError(Exception):
    pass


def _engine_connect_args(url: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """What `make_engine(url)` passes its driver's connect()."""
    engine = make_engine(url)
    seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    @sa.event.listens_for(engine, "do_connect")
    def capture(_dialect: Any, _record: Any, cargs: Any, cparams: Any) -> None:
        seen.append((tuple(cargs), dict(cparams)))
        raise _StopError

    with pytest.raises(_StopError):
        engine.connect()
    engine.dispose()
    args, kwargs = seen[0]
    kwargs.pop("context", None)  # SQLAlchemy's own type adapters (psycopg), for its types
    return args, kwargs


@pytest.mark.parametrize("url", DIRECT)
def test_a_direct_connection_gets_the_engines_arguments(url: str) -> None:
    direct = DirectConnector.for_url(url)
    assert direct is not None
    assert (direct.args, direct.kwargs) == _engine_connect_args(url)


@pytest.mark.parametrize("url", THROUGH_SQLALCHEMY)
def test_other_urls_are_left_to_sqlalchemy(url: str) -> None:
    assert DirectConnector.for_url(url) is None


def test_sqlite_file() -> None:
    assert sqlite_file("sqlite:///./a/falhook.db") == Path("./a/falhook.db")
    assert sqlite_file("sqlite:////abs/f.db") == Path("/abs/f.db")
    for url in ("sqlite://", "sqlite:///:memory:", "sqlite:///file:x?uri=true", "postgresql:///d"):
        assert sqlite_file(url) is None


def test_schema_version_is_the_last_migration() -> None:
    assert MIGRATIONS[-1].version == SCHEMA_VERSION


def test_direct_and_pooled_admins_read_the_same(store_url: str) -> None:
    # The one query module, on either kind of connection.
    store = Store(store_url)
    store.migrate()

    async def fill() -> None:
        store.start()
        try:
            for rid in ("a", "b"):
                await store.insert(delivery(rid))
        finally:
            await store.stop()

    asyncio.run(fill())
    direct = Admin(DirectConnector.for_url(store_url) or pytest.fail("not direct"))
    pooled = Admin(EngineConnector(make_engine(store_url), owns_engine=True))
    try:
        for admin in (direct, pooled):
            assert admin.check_schema() == SCHEMA_VERSION
        assert direct.list() == pooled.list() == store.list()
        assert direct.get("a") == pooled.get("a") is not None
        assert direct.counts() == pooled.counts() == {**dict.fromkeys(State, 0), State.PENDING: 2}
        assert direct.dispatch_control() == pooled.dispatch_control()
    finally:
        direct.close()
        pooled.close()
        store.engine.dispose()


def test_a_failed_connection_is_one_line(tmp_path: Path) -> None:
    directory = tmp_path / "a-directory.db"
    directory.mkdir()
    admin = Admin.open(f"sqlite:///{directory}")
    with pytest.raises(StoreUnavailableError, match=r"^cannot connect: unable to open database"):
        admin.check_schema()
    admin.close()


def test_a_store_file_that_cannot_be_opened_is_store_unavailable(tmp_path: Path) -> None:
    # SQLAlchemy's raw_connection() passes sqlite3's own error through: the connectors
    # must still say "store unavailable" (503, retried), never let sqlite3's escape.
    url = f"sqlite:///{tmp_path / 'gone' / 'falhook.db'}"
    engine = make_engine(url)
    try:
        with pytest.raises(StoreUnavailableError, match=r"cannot connect: .*unable to open"):
            EngineConnector(engine).connect()
        with pytest.raises(StoreUnavailableError, match=r"cannot connect: .*unable to open"):
            Connection(engine, ensure_schema=lambda: None).get()  # the writer's
    finally:
        engine.dispose()


def test_a_deleted_store_file_is_not_created_again(tmp_path: Path) -> None:
    # The first connection makes the file (serve's first start); once it was opened, a
    # file deleted under the receiver stays deleted: every later connection is refused.
    path = tmp_path / "odd name#1%.db"  # quoted in the URI sqlite3 is given
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("CREATE TABLE t (x)")
        assert path.exists()
        engine.dispose()  # no pooled connection left: the next one is opened afresh
        with engine.connect() as conn:  # the file is there: opened as before
            assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar() == 0
        engine.dispose()
        path.unlink()
        with pytest.raises(StoreUnavailableError, match=r"cannot connect: .*unable to open"):
            EngineConnector(engine).connect()
        with pytest.raises(StoreUnavailableError, match=r"cannot connect: .*unable to open"):
            Connection(engine, ensure_schema=lambda: None).get()  # the writer's
        assert not path.exists()
    finally:
        engine.dispose()
