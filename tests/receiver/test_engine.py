"""The store's connections (store/engine.py): what a URL names, and failures as one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from falhook.receiver.errors import StoreUnavailableError
from falhook.receiver.store.admin import Admin
from falhook.receiver.store.engine import make_engine, sqlite_file
from falhook.receiver.store.migrations import MIGRATIONS, SCHEMA_VERSION
from falhook.receiver.store.writer import Connection


def test_sqlite_file() -> None:
    assert sqlite_file("sqlite:///./a/falhook.db") == Path("./a/falhook.db")
    assert sqlite_file("sqlite:////abs/f.db") == Path("/abs/f.db")
    for url in ("sqlite://", "sqlite:///:memory:", "sqlite:///file:x?uri=true", "postgresql:///d"):
        assert sqlite_file(url) is None
    assert sqlite_file("not a url") is None


def test_schema_version_is_the_last_migration() -> None:
    assert MIGRATIONS[-1].version == SCHEMA_VERSION


def test_a_failed_connection_is_one_line(tmp_path: Path) -> None:
    directory = tmp_path / "a-directory.db"
    directory.mkdir()
    admin = Admin.open(f"sqlite:///{directory}")
    with pytest.raises(StoreUnavailableError, match=r"^cannot connect: unable to open database"):
        admin.check_schema()
    admin.close()


def test_a_store_file_that_cannot_be_opened_is_store_unavailable(tmp_path: Path) -> None:
    # sqlite3's own error must not escape: "store unavailable" (503, retried).
    url = f"sqlite:///{tmp_path / 'gone' / 'falhook.db'}"
    admin = Admin.open(url)
    try:
        with pytest.raises(StoreUnavailableError, match=r"cannot connect: .*unable to open"):
            admin.check_schema()
        with pytest.raises(StoreUnavailableError, match=r"cannot connect: .*unable to open"):
            Connection(admin.engine, ensure_schema=lambda: None).get()  # the writer's
    finally:
        admin.close()


def test_a_deleted_store_file_is_not_created_again(tmp_path: Path) -> None:
    # The first connection makes the file (serve's first start); once it was opened, a
    # file deleted under the receiver stays deleted: every later connection is refused.
    path = tmp_path / "odd name#1%.db"  # quoted in the URI sqlite3 is given
    engine = make_engine(f"sqlite:///{path}")
    admin = Admin(engine)
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
            admin.schema_version()
        with pytest.raises(StoreUnavailableError, match=r"cannot connect: .*unable to open"):
            Connection(engine, ensure_schema=lambda: None).get()  # the writer's
        assert not path.exists()
    finally:
        engine.dispose()
