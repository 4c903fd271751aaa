"""The expectations table: record, claim (fenced, leased), settle, sweep, expire, list.

Run on SQLite (always) and PostgreSQL (TEST_DATABASE_URL), on real databases.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from falhook.receiver.models import SOURCE_QUEUE, ExpectationRow
from falhook.receiver.store import Store
from falhook.receiver.store.expectations import (
    Expectations,
    ExpectationState,
    NewExpectation,
)
from falhook.receiver.store.migrations import MIGRATIONS, upgrade
from tests.receiver import store_fixtures
from tests.receiver.store_fixtures import delivery
from tests.receiver.test_migrations import _other_database, _shape, engine_for

pg_schema_url = store_fixtures.pg_schema_url
store_url = store_fixtures.store_url

T = TypeVar("T")
S = ExpectationState


def run(fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await fn()

    return asyncio.run(main())


@contextlib.asynccontextmanager
async def opened(url: str) -> AsyncIterator[tuple[Store, Expectations]]:
    store = Store(url)
    store.start()
    try:
        yield store, Expectations(store)
    finally:
        await store.stop()


def new(rid: str, endpoint: str = "fal-ai/flux/dev", **kw: Any) -> NewExpectation:
    return NewExpectation(rid, endpoint, **kw)


def test_migrated_table_matches_the_model(store_url: str, tmp_path: Path) -> None:
    table: sa.Table = ExpectationRow.__table__  # type: ignore[attr-defined]
    with engine_for(store_url) as engine:
        upgrade(engine)
    with _other_database(store_url, tmp_path) as model_url:
        with engine_for(model_url) as engine:
            table.create(engine)
        migrated, modelled = _shape(store_url, table.name), _shape(model_url, table.name)
    assert migrated == modelled
    assert migrated["pk"] == ["request_id"]
    for column in table.columns:
        assert migrated["columns"][column.name][1] == column.nullable, column.name


@contextlib.contextmanager
def sync_expectations(url: str) -> Iterator[Expectations]:
    store = Store(url)
    store.migrate()  # as `falhook serve` would have
    try:
        yield Expectations(store)
    finally:
        store.engine.dispose()


def test_add_is_idempotent_and_learns_urls(store_url: str) -> None:
    with sync_expectations(store_url) as expectations:
        _add_is_idempotent(expectations)


def _add_is_idempotent(expectations: Expectations) -> None:
    assert expectations.add(new("r1"), recover_after=60, ttl=3600)
    assert not expectations.add(new("r1", status_url="http://q/s"), recover_after=60, ttl=3600)
    got = expectations.get("r1")
    assert got is not None
    assert got.state is S.WAITING and got.endpoint_id == "fal-ai/flux/dev"
    assert got.status_url == "http://q/s" and got.response_url is None
    assert got.expires_at - got.created_at == pytest.approx(3600)
    assert got.due_at - got.created_at == pytest.approx(60)
    assert expectations.get("nope") is None
    counts = expectations.counts()
    assert counts[S.WAITING] == 1 and sum(counts.values()) == 1


def test_expecting_a_failed_one_again_rearms_it(store_url: str) -> None:
    # How an operator retries it, e.g. once a wrong fal key is fixed. An active or settled
    # one is left as it is.
    async def body() -> None:
        async with opened(store_url) as (_, ex):
            for rid in ("bad-key", "arrived"):
                await ex.run(ex.op_add(new(rid), recover_after=0, ttl=3600))
            claims, _ = await ex.run(ex.op_claim(limit=10, lease_seconds=30))
            by_id = {c.request_id: c for c in claims}
            reason = "unauthorized: status answered 401"
            assert await ex.run(ex.op_update(by_id["bad-key"], state=S.FAILED, reason=reason))
            assert await ex.run(ex.op_update(by_id["arrived"], state=S.ARRIVED))
            before = time.time()
            assert await ex.run(ex.op_add(new("bad-key"), recover_after=60, ttl=3600)) is True
            assert await ex.run(ex.op_add(new("arrived"), recover_after=60, ttl=3600)) is False
            got = await asyncio.to_thread(ex.get, "bad-key")
            assert got is not None and got.state is S.WAITING and got.reason is None
            assert got.polls == 0 and got.finished_at is None and got.claim_id is None
            assert before <= got.due_at <= time.time()  # due at once, not after recover-after
            assert got.expires_at >= before + 3600
            settled = await asyncio.to_thread(ex.get, "arrived")
            assert settled is not None and settled.state is S.ARRIVED
            again, _ = await ex.run(ex.op_claim(limit=10, lease_seconds=30))
            assert [c.request_id for c in again] == ["bad-key"]

    run(body)


def test_claim_takes_only_due_rows_and_fences_writes(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as (_, ex):
            await ex.run(ex.op_add(new("due"), recover_after=0, ttl=3600))
            await ex.run(ex.op_add(new("later"), recover_after=60, ttl=3600))
            claims, next_due = await ex.run(ex.op_claim(limit=10, lease_seconds=30))
            assert [c.request_id for c in claims] == ["due"]
            assert claims[0].delivered is None
            assert next_due is not None and next_due > time.time() + 25  # lease or "later"
            # Claimed: not claimable again while the lease holds.
            again, _ = await ex.run(ex.op_claim(limit=10, lease_seconds=30))
            assert again == []
            claim = claims[0]
            ok = await ex.run(
                ex.op_update(
                    claim,
                    state=S.POLLING,
                    due_at=time.time() - 1,
                    polled=True,
                    queue_status="IN_PROGRESS",
                )
            )
            assert ok
            # The same claim again: fenced (the row was released).
            assert not await ex.run(ex.op_update(claim, state=S.FAILED, reason="x"))
            second, _ = await ex.run(ex.op_claim(limit=10, lease_seconds=30))
            assert [c.request_id for c in second] == ["due"]
            got = second[0].expectation
            assert got.state is S.POLLING and got.polls == 1
            assert got.queue_status == "IN_PROGRESS"
            done = await ex.run(ex.op_update(second[0], state=S.FAILED, reason="not_found"))
            assert done
            await asyncio.to_thread(check_listing, ex)

    run(body)


def check_listing(ex: Expectations) -> None:
    listed = ex.list()
    assert {e.request_id: (e.state, e.reason) for e in listed} == {
        "due": (S.FAILED, "not_found"),
        "later": (S.WAITING, None),
    }
    assert listed[0].request_id == "later"  # newest first
    assert [e.request_id for e in ex.list(states=[S.FAILED])] == ["due"]
    failed = ex.get("due")
    assert failed is not None and failed.finished_at is not None


def test_an_expired_lease_is_retaken(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as (_, ex):
            await ex.run(ex.op_add(new("r"), recover_after=0, ttl=3600))
            first, _ = await ex.run(ex.op_claim(limit=10, lease_seconds=0.05))
            await asyncio.sleep(0.1)
            second, _ = await ex.run(ex.op_claim(limit=10, lease_seconds=30))
            assert [c.request_id for c in second] == ["r"]
            assert second[0].claim_id != first[0].claim_id
            assert not await ex.run(ex.op_update(first[0], state=S.FAILED, reason="late"))
            assert await ex.run(ex.op_update(second[0], state=S.FAILED, reason="mine"))
            got = await ex.run(ex.op_get("r"))
            assert got.reason == "mine"

    run(body)


def test_claim_reports_a_stored_delivery_and_settles_by_its_source(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as (store, ex):
            for rid in ("hooked", "fetched"):
                await ex.run(ex.op_add(new(rid), recover_after=0, ttl=3600))
            await store.insert(delivery("hooked"))
            await store.insert(dataclasses.replace(delivery("fetched"), source=SOURCE_QUEUE))
            claims, _ = await ex.run(ex.op_claim(limit=10, lease_seconds=30))
            by_id = {c.request_id: c for c in claims}
            assert by_id["hooked"].delivered == "webhook"
            assert by_id["fetched"].delivered == "queue"
            assert await ex.run(ex.op_settle_delivered(by_id["hooked"])) is S.ARRIVED
            assert await ex.run(ex.op_settle_delivered(by_id["fetched"], reason="r")) is (
                S.RECOVERED
            )
            assert await ex.run(ex.op_settle_delivered(by_id["fetched"])) is None  # fenced
            fetched = await asyncio.to_thread(store.get, "fetched")
            hooked = await asyncio.to_thread(store.get, "hooked")
            assert fetched is not None and fetched.source == "queue"
            assert hooked is not None and hooked.source == "webhook"

    run(body)


def test_sweep_settles_delivered_and_expires_overdue(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as (store, ex):
            await ex.run(ex.op_add(new("hooked"), recover_after=60, ttl=3600))
            await ex.run(ex.op_add(new("old-hook"), recover_after=60, ttl=3600))
            await ex.run(ex.op_add(new("fetched"), recover_after=60, ttl=3600))
            await ex.run(ex.op_add(new("overdue"), recover_after=60, ttl=0.001))
            await ex.run(ex.op_add(new("quiet"), recover_after=60, ttl=3600))
            now = time.time()
            await store.insert(delivery("hooked"))
            await store.insert(delivery("old-hook", received_at=now - 600))
            await store.insert(dataclasses.replace(delivery("fetched"), source=SOURCE_QUEUE))
            await asyncio.sleep(0.01)
            swept = await ex.run(ex.op_sweep(since=now - 5, ttl_reason="ttl"))
            assert swept.settled == {
                "hooked": S.ARRIVED,
                "fetched": S.RECOVERED,
                "overdue": S.EXPIRED,
            }
            # A full sweep (at start) finds the old delivery too.
            full = await ex.run(ex.op_sweep(since=None, ttl_reason="ttl"))
            assert full.settled == {"old-hook": S.ARRIVED}
            assert (await ex.run(ex.op_sweep(since=None, ttl_reason="ttl"))).settled == {}
            overdue = await ex.run(ex.op_get("overdue"))
            assert overdue is not None and overdue.reason == "ttl"
            counts = await asyncio.to_thread(ex.counts)
            assert counts[S.WAITING] == 1

    run(body)


def test_sweep_leaves_a_claimed_one_to_its_claimant(store_url: str) -> None:
    # The claimant fetched the result and stored it: its settle says so, not the sweep's.
    async def body() -> None:
        async with opened(store_url) as (store, ex):
            await ex.run(ex.op_add(new("r"), recover_after=0, ttl=3600))
            (claim,), _ = await ex.run(ex.op_claim(limit=10, lease_seconds=300))
            now = time.time()
            await store.insert(dataclasses.replace(delivery("r"), source=SOURCE_QUEUE))
            assert (await ex.run(ex.op_sweep(since=now - 5, ttl_reason="ttl"))).settled == {}
            settled = ex.op_settle_delivered(claim, reason="fetched from fal's queue (OK)")
            assert await ex.run(settled) is S.RECOVERED
            found = await ex.run(ex.op_get("r"))
            assert found is not None and found.reason == "fetched from fal's queue (OK)"
            # A lease that ran out is nobody's: the sweep settles it.
            await ex.run(ex.op_add(new("gone"), recover_after=0, ttl=3600))
            await ex.run(ex.op_claim(limit=10, lease_seconds=0.001))
            await store.insert(delivery("gone"))
            await asyncio.sleep(0.01)
            swept = await ex.run(ex.op_sweep(since=now - 5, ttl_reason="ttl"))
            assert swept.settled == {"gone": S.ARRIVED}

    run(body)


def test_mark_and_release(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as (_, ex):
            await ex.run(ex.op_add(new("r"), recover_after=0, ttl=3600))
            claims, _ = await ex.run(ex.op_claim(limit=10, lease_seconds=300))
            await ex.run(ex.op_release([claims[0].claim_id]))
            again, _ = await ex.run(ex.op_claim(limit=10, lease_seconds=300))
            assert [c.request_id for c in again] == ["r"]
            assert await ex.run(ex.op_mark("r", S.RECOVERED, "payload_error: fetched"))
            assert not await ex.run(ex.op_mark("unknown", S.RECOVERED, None))
            got = await ex.run(ex.op_get("r"))
            assert got.state is S.RECOVERED and got.claim_id is None

    run(body)


@store_fixtures.requires_pg
def test_two_claimers_never_share_a_row(pg_schema_url: str) -> None:
    """Two stores (two replicas) claiming at once on PostgreSQL split the rows."""

    async def body() -> None:
        async with opened(pg_schema_url) as (_, a), opened(pg_schema_url) as (_, b):
            for i in range(40):
                await a.run(a.op_add(new(f"r{i}"), recover_after=0, ttl=3600))
            results = await asyncio.gather(
                *(x.run(x.op_claim(limit=7, lease_seconds=30)) for x in (a, b, a, b, a, b, a, b))
            )
            ids = [c.request_id for claims, _ in results for c in claims]
            assert len(ids) == len(set(ids)) == 40

    run(body)


def test_deliveries_stored_before_migration_4_came_by_webhook(store_url: str) -> None:
    with engine_for(store_url) as engine:
        assert upgrade(engine, MIGRATIONS[:3]) == 3
        with engine.begin() as conn:
            conn.execute(
                sa.text(
                    "INSERT INTO falhook_deliveries (request_id, status, received_at, state, "
                    "attempts, due_at, updated_at) VALUES ('old', 'OK', 1, 'done', 1, 1, 1)"
                )
            )
        assert upgrade(engine) == MIGRATIONS[-1].version
    store = Store(store_url)
    try:
        got = store.get("old")
        assert got is not None and got.source == "webhook"
    finally:
        store.engine.dispose()


def test_settings_for_recovery() -> None:
    from falhook.receiver import Settings, SettingsError

    s = Settings.from_env({"FAL_KEY": "k1"})
    assert s.fal_key == "k1" and s.recovery_enabled
    assert "k1" not in repr(s)
    assert Settings.from_env({"FAL_KEY": "k1", "FALHOOK_FAL_KEY": "k2"}).fal_key == "k2"
    assert not Settings.from_env({}).recovery_enabled
    # The defaults recover a lost result well inside fal's ~6 minutes of retention.
    assert s.recover_poll_seconds + s.recover_grace_seconds <= 120
    assert s.queue_url == "https://queue.fal.run" and s.expect_ttl_seconds == 86400
    env = {
        "FALHOOK_QUEUE_URL": "http://127.0.0.1:9/",
        "FALHOOK_PUBLIC_URL": "https://hooks.example.com/",
        "FALHOOK_RECOVER_AFTER_SECONDS": "0.25",
        "FALHOOK_RECOVER_POLL_SECONDS": "0.1",
        "FALHOOK_RECOVER_GRACE_SECONDS": "0",
        "FALHOOK_EXPECT_TTL_SECONDS": "5",
    }
    t = Settings.from_env(env)
    assert (t.queue_url, t.public_url) == ("http://127.0.0.1:9", "https://hooks.example.com")
    assert (t.recover_after_seconds, t.recover_poll_seconds) == (0.25, 0.1)
    assert (t.recover_grace_seconds, t.expect_ttl_seconds) == (0.0, 5.0)
    for name, bad in [
        ("FALHOOK_QUEUE_URL", "queue.fal.run"),
        ("FALHOOK_PUBLIC_URL", "ftp://x"),
        ("FALHOOK_RECOVER_POLL_SECONDS", "0"),
        ("FALHOOK_RECOVER_AFTER_SECONDS", "-1"),
    ]:
        with pytest.raises(SettingsError, match=name):
            Settings.from_env({name: bad})
