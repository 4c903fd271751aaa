"""Versioned migrations: fresh databases, upgrades of older ones, and the model's shape.

Run on SQLite (always) and PostgreSQL (TEST_DATABASE_URL), against real databases.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from falhook.receiver.models import ATTEMPTS, CONTROL, BodyRow, DeliveryRow, State
from falhook.receiver.store import Store, make_engine
from falhook.receiver.store.migrations import MIGRATIONS, VERSION_TABLE, current_version, upgrade
from tests.receiver import store_fixtures
from tests.receiver.store_fixtures import delivery, fresh_pg_schema

# Fixtures, re-exported so pytest finds them in this module.
pg_schema_url = store_fixtures.pg_schema_url
store_url = store_fixtures.store_url

LATEST = MIGRATIONS[-1].version
TABLE: sa.Table = DeliveryRow.__table__  # type: ignore[attr-defined]
BODIES: sa.Table = BodyRow.__table__  # type: ignore[attr-defined]


@contextlib.contextmanager
def engine_for(url: str) -> Iterator[sa.Engine]:
    engine = make_engine(url)
    try:
        yield engine
    finally:
        engine.dispose()


def version_of(url: str) -> int:
    with engine_for(url) as engine, engine.connect() as conn:
        return current_version(conn)


def test_fresh_database_is_brought_to_the_latest_version(store_url: str) -> None:
    assert version_of(store_url) == 0
    with engine_for(store_url) as engine:
        assert upgrade(engine) == LATEST
        assert upgrade(engine) == LATEST  # idempotent
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT version FROM {VERSION_TABLE} ORDER BY 1"))
            assert [r[0] for r in rows] == [m.version for m in MIGRATIONS]


def test_versions_are_consecutive() -> None:
    assert [m.version for m in MIGRATIONS] == list(range(1, len(MIGRATIONS) + 1))


def v1_body(rid: str) -> bytes:
    return b'{"request_id":"%s","status":"OK","payload":{}}' % rid.encode()


def _v1_rows(now: float) -> list[dict[str, Any]]:
    base: dict[str, Any] = {
        "gateway_request_id": None,
        "status": "OK",
        "error": None,
        "payload_error": None,
        "user_id": "u",
        "received_at": now - 60,
        "attempts": 0,
        "due_at": now - 60,
        "claim_id": None,
        "last_error": None,
        "completed_callbacks": None,
        "updated_at": now - 60,
        "finished_at": None,
    }

    return [
        {**base, "request_id": "old-pending", "body": v1_body("old-pending"), "state": "pending"},
        {
            **base,
            "request_id": "old-done",
            "body": v1_body("old-done"),
            "state": "done",
            "attempts": 1,
            "completed_callbacks": '["cb"]',
            "finished_at": now - 30,
        },
        {
            **base,
            "request_id": "old-dead",
            "body": v1_body("old-dead"),
            "state": "dead",
            "attempts": 10,
            "last_error": "boom",
            "finished_at": now - 30,
        },
        {
            **base,
            "request_id": "old-running",
            "body": v1_body("old-running"),
            "state": "running",
            "attempts": 1,
            "claim_id": "gone-worker",
            "due_at": now - 1,  # its lease expired while falhook was being upgraded
        },
    ]


def test_database_written_by_v1_keeps_working_after_upgrade(store_url: str) -> None:
    now = time.time()
    with engine_for(store_url) as engine:
        assert upgrade(engine, MIGRATIONS[:1]) == 1  # exactly what falhook v1 created
        with engine.begin() as conn:
            # Written with v1's own table definition, not the current model.
            v1 = sa.Table("falhook_deliveries", sa.MetaData(), autoload_with=conn)
            conn.execute(v1.insert(), _v1_rows(now))
            indexes = {ix["name"] for ix in sa.inspect(conn).get_indexes("falhook_deliveries")}
            assert "ix_falhook_deliveries_active_due" not in indexes

    async def body() -> None:
        store = Store(store_url)
        store.start()
        try:
            assert store.migrate() == LATEST
            assert {r.request_id for r in store.list()} == {
                "old-pending",
                "old-done",
                "old-dead",
                "old-running",
            }
            done = store.get("old-done")
            assert done is not None
            assert done.state is State.DONE and done.completed_callbacks == ("cb",)
            # Each body came along, byte for byte, joined to its own delivery.
            for rid in ("old-pending", "old-done", "old-dead", "old-running"):
                stored = store.get(rid)
                assert stored is not None and stored.body == v1_body(rid), rid
            dead = store.get("old-dead")
            assert dead is not None and dead.last_error == "boom"
            # The store works on the upgraded rows: the pending one and the expired
            # running one are claimed, a new insert dedupes against an old row.
            batch = await store.claim(10, 30)
            assert {c.request_id: c.attempt for c in batch.claims} == {
                "old-pending": 1,
                "old-running": 2,
            }
            assert {c.request_id: c.body for c in batch.claims} == {
                rid: v1_body(rid) for rid in ("old-pending", "old-running")
            }
            assert await store.insert(delivery("old-done")) is False
            assert await store.insert(delivery("old-dead")) is False  # revived
            assert await store.insert(delivery("new")) is True
            assert {c.request_id for c in (await store.claim(10, 30)).claims} == {
                "old-dead",
                "new",
            }
            assert store.replay(["old-done"]) == {"old-done": State.DONE}
        finally:
            await store.stop()

    asyncio.run(body())
    assert version_of(store_url) == LATEST


def test_concurrent_upgrades_apply_each_migration_once(store_url: str) -> None:
    """Replicas starting together: one migrates, the others wait and find it done."""
    errors: list[BaseException] = []
    results: list[int] = []
    barrier = threading.Barrier(4)

    def migrate() -> None:
        with engine_for(store_url) as engine:
            barrier.wait()
            try:
                results.append(upgrade(engine))
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert results == [LATEST] * 4
    with engine_for(store_url) as engine, engine.connect() as conn:
        count = conn.execute(sa.text(f"SELECT count(*) FROM {VERSION_TABLE}")).scalar_one()
        assert count == len(MIGRATIONS)


# -- the migrated schema is the SQLModel table ---------------------------------------------


def _shape(url: str, table: str) -> dict[str, Any]:
    with engine_for(url) as engine, engine.connect() as conn:
        inspector = sa.inspect(conn)
        columns = {
            c["name"]: (
                c["type"].compile(dialect=engine.dialect),
                c["nullable"],
            )
            for c in inspector.get_columns(table)
        }
        pk = inspector.get_pk_constraint(table)["constrained_columns"]
        indexes = {
            ix["name"]: (
                tuple(ix["column_names"]),
                bool(ix["unique"]),
                _where(ix.get("dialect_options", {})),
            )
            for ix in inspector.get_indexes(table)
        }
        return {"columns": columns, "pk": pk, "indexes": indexes}


def _where(options: dict[str, Any]) -> str | None:
    where = options.get("postgresql_where") or options.get("sqlite_where")
    return " ".join(str(where).split()) if where is not None else None


@contextlib.contextmanager
def _other_database(store_url: str, tmp_path: Path) -> Iterator[str]:
    if store_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'model.db'}"
    else:
        with fresh_pg_schema() as url:
            yield url


@pytest.mark.parametrize("table", [TABLE, BODIES, ATTEMPTS, CONTROL], ids=lambda t: t.name)
def test_migrated_schema_matches_the_sqlmodel_table(
    store_url: str, tmp_path: Path, table: sa.Table
) -> None:
    with engine_for(store_url) as engine:
        upgrade(engine)
    with _other_database(store_url, tmp_path) as model_url:
        with engine_for(model_url) as engine:
            table.create(engine)  # what the current model alone would create
        migrated, modelled = _shape(store_url, table.name), _shape(model_url, table.name)
    assert migrated["columns"] == modelled["columns"]
    assert migrated["pk"] == modelled["pk"] == ["id"]
    assert migrated["indexes"] == modelled["indexes"]
    assert set(migrated["indexes"]) == {ix.name for ix in table.indexes}
    # Nullability, spelled out from the model (the claim path relies on these).
    for column in table.columns:
        assert migrated["columns"][column.name][1] == column.nullable, column.name


def test_sqlite_delivery_id_is_the_rowid(tmp_path: Path) -> None:
    """Only "INTEGER PRIMARY KEY" makes the key the rowid: in order, and no second index."""
    url = f"sqlite:///{tmp_path / 'rowid.db'}"
    with engine_for(url) as engine:
        upgrade(engine)
        with engine.connect() as conn:
            for table in ("falhook_deliveries", "falhook_bodies"):
                # A primary key that is not the rowid gets an index of origin "pk".
                origins = [row[3] for row in conn.exec_driver_sql(f"PRAGMA index_list({table})")]
                assert "pk" not in origins, (table, origins)


@pytest.mark.postgres
def test_pg_claim_and_next_due_can_use_the_partial_index(pg_schema_url: str) -> None:
    """The store's literal active predicate implies the partial index's predicate."""

    async def body() -> None:
        store = Store(pg_schema_url)
        store.start()
        try:
            for i in range(20):
                await store.insert(delivery(f"r{i}"))
            with store.engine.connect() as conn:
                conn.exec_driver_sql("SET enable_seqscan = off")
                conn.exec_driver_sql("SET enable_bitmapscan = off")
                sql = store._sql.next_due
                plan = "\n".join(
                    r[0] for r in conn.exec_driver_sql("EXPLAIN " + sql.sql, sql.args())
                )
            assert "ix_falhook_deliveries_active_due" in plan, plan
        finally:
            await store.stop()

    asyncio.run(body())
