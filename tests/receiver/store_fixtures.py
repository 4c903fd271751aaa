"""Store fixtures: a real database per test, SQLite always, PostgreSQL when configured.

Import the fixtures into a test module (``from tests.receiver.store_fixtures import
store_url  # noqa: F401``). ``store_url`` is parametrized over both dialects:

- ``sqlite``: a fresh file in ``tmp_path``;
- ``postgresql``: a fresh schema in the database of ``TEST_DATABASE_URL`` (selected with
  libpq's ``options=-csearch_path=…``, so migrations and the store see an empty
  database), dropped afterwards. Skipped when ``TEST_DATABASE_URL`` is unset.

No database is ever mocked.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from falhook.receiver.store import NewDelivery

__all__ = [
    "PG_URL",
    "delivery",
    "fresh_pg_schema",
    "pg_admin",
    "pg_schema_url",
    "requires_pg",
    "store_url",
]

PG_URL = os.environ.get("TEST_DATABASE_URL") or None
requires_pg = pytest.mark.skipif(PG_URL is None, reason="TEST_DATABASE_URL is not set")


def pg_admin() -> sa.Engine:
    """An engine on the test database's default schema (autocommit), for setup and checks."""
    assert PG_URL is not None
    return sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)


def _with_schema(url: str, schema: str) -> str:
    parsed = sa.make_url(url)
    return parsed.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False
    )


@contextlib.contextmanager
def fresh_pg_schema() -> Iterator[str]:
    """A URL on a new, empty PostgreSQL schema, dropped on exit."""
    assert PG_URL is not None
    schema = f"falhook_t_{uuid.uuid4().hex[:12]}"
    admin = pg_admin()
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
    try:
        yield _with_schema(PG_URL, schema)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        admin.dispose()


@pytest.fixture
def pg_schema_url() -> Iterator[str]:
    """A URL on a fresh, empty PostgreSQL schema (skips without TEST_DATABASE_URL)."""
    if PG_URL is None:
        pytest.skip("TEST_DATABASE_URL is not set")
    with fresh_pg_schema() as url:
        yield url


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL to an empty store database: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'falhook.db'}"
    url: str = request.getfixturevalue("pg_schema_url")
    return url


def delivery(
    request_id: str,
    *,
    status: str = "OK",
    received_at: float | None = None,
    body: bytes | None = None,
) -> NewDelivery:
    """A delivery as the webhook route would hand it to the store."""
    if body is None:
        body = b'{"request_id":"%s","gateway_request_id":"gw-%s","status":"%s","payload":{}}' % (
            request_id.encode(),
            request_id.encode(),
            status.encode(),
        )
    return NewDelivery(
        request_id=request_id,
        gateway_request_id=f"gw-{request_id}",
        status=status,
        error=None,
        payload_error=None,
        user_id="user-1",
        body=body,
        received_at=time.time() if received_at is None else received_at,
    )
