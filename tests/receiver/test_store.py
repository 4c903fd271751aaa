"""The store contract: the same suite on SQLite (always) and PostgreSQL (TEST_DATABASE_URL).

Every test runs against a real database (a file in tmp_path, or a fresh PostgreSQL schema);
nothing is mocked. Async store calls run on a loop of the test's own (``asyncio.run``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from falhook.receiver.errors import StoreUnavailableError
from falhook.receiver.models import State
from falhook.receiver.store import Claim, Store
from falhook.receiver.store.records import column_text
from falhook.receiver.store.statements import Compiled
from tests.receiver import store_fixtures
from tests.receiver.store_fixtures import PG_URL, delivery, pg_admin, requires_pg

# Fixtures, re-exported so pytest finds them in this module.
pg_schema_url = store_fixtures.pg_schema_url
store_url = store_fixtures.store_url

T = TypeVar("T")


def run(fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await fn()

    return asyncio.run(main())


@contextlib.asynccontextmanager
async def opened(url: str, **kwargs: Any) -> AsyncIterator[Store]:
    store = Store(url, **kwargs)
    store.start()
    try:
        yield store
    finally:
        await store.stop()


async def claim_all(store: Store, limit: int = 100, lease: float = 30.0) -> list[Claim]:
    return (await store.claim(limit, lease)).claims


def row_counts(store: Store) -> tuple[int, int]:
    """(state rows, body rows), read straight from the tables."""
    with store.engine.connect() as conn:
        return (
            conn.exec_driver_sql("SELECT count(*) FROM falhook_deliveries").scalar_one(),
            conn.exec_driver_sql("SELECT count(*) FROM falhook_bodies").scalar_one(),
        )


# -- insert and dedupe -------------------------------------------------------------------


def test_insert_new_then_duplicate(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            assert await store.insert(delivery("a")) is True
            assert await store.insert(delivery("a")) is False
            assert await store.insert(delivery("b")) is True
            row = store.get("a")
            assert row is not None
            assert row.state is State.PENDING
            assert row.attempts == 0
            assert row.status == "OK"
            assert row.gateway_request_id == "gw-a"
            assert row.body == delivery("a").body
            assert store.get("missing") is None
            assert row_counts(store) == (2, 2)  # the duplicate wrote no second body

    run(body)


def test_duplicate_of_a_dead_delivery_revives_it(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            await store.insert(delivery("a"))
            (claim,) = await claim_all(store)
            assert await store.bury(claim, "boom") is True
            assert store.get("a").state is State.DEAD  # type: ignore[union-attr]
            assert await store.insert(delivery("a")) is False  # still a duplicate to fal…
            row = store.get("a")
            assert row is not None  # …but the failure is not hidden: it is due again
            assert row.state is State.PENDING
            assert row.attempts == 0
            assert row.finished_at is None
            (again,) = await claim_all(store)
            assert again.request_id == "a"
            assert again.attempt == 1

    run(body)


@pytest.mark.parametrize("state", ["pending", "running"])
def test_a_duplicate_in_flight_rearms_it_if_it_then_dies(store_url: str, state: str) -> None:
    # The same as a duplicate after it died, whichever comes first: fal sent it again, so
    # giving up (its last attempt failing) gives it another set of attempts.
    async def body() -> None:
        async with opened(store_url) as store:
            for rid in ("a", "b"):
                await store.insert(delivery(rid))
            if state == "pending":
                assert await store.insert(delivery("a")) is False
            claims = {c.request_id: c for c in await claim_all(store)}
            if state == "running":
                assert await store.insert(delivery("a")) is False
            assert store.get("a").state is State.RUNNING  # type: ignore[union-attr]
            assert await store.bury(claims["a"], "boom") is True
            assert await store.bury(claims["b"], "boom") is True  # no duplicate: dead
            assert store.get("b").state is State.DEAD  # type: ignore[union-attr]
            row = store.get("a")
            assert row is not None and row.state is State.PENDING and row.attempts == 0
            (again,) = await claim_all(store)
            assert (again.request_id, again.attempt) == ("a", 1)
            # Re-armed once: with no new duplicate, giving up again is final.
            assert await store.bury(again, "boom again") is True
            assert store.get("a").state is State.DEAD  # type: ignore[union-attr]

    run(body)


def test_a_duplicate_in_flight_is_forgotten_once_it_succeeds(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            await store.insert(delivery("a"))
            (claim,) = await claim_all(store)
            assert await store.insert(delivery("a")) is False
            assert await store.finish(claim, ["cb"]) is True
            # An operator's replay that then gives up is not re-armed by the old duplicate.
            assert store.replay(["a"]) == {"a": State.DONE.value}
            (again,) = await claim_all(store)
            assert await store.bury(again, "boom") is True
            assert store.get("a").state is State.DEAD  # type: ignore[union-attr]

    run(body)


def test_duplicate_of_a_done_delivery_changes_nothing(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            await store.insert(delivery("a"))
            (claim,) = await claim_all(store)
            assert await store.finish(claim, ["cb"]) is True
            before = store.get("a")
            assert await store.insert(delivery("a")) is False
            assert store.get("a") == before
            assert await claim_all(store) == []

    run(body)


# -- claims ------------------------------------------------------------------------------


def test_claim_orders_by_due_at_and_respects_the_limit(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            now = time.time()
            # Inserted out of order; due_at starts at received_at.
            for i in (3, 0, 4, 1, 2):
                await store.insert(delivery(f"r{i}", received_at=now - 100 + i))
            # The earliest due are taken first (RETURNING order within a batch is unspecified).
            first = await store.claim(2, 30)
            assert {c.request_id for c in first.claims} == {"r0", "r1"}
            assert all(c.attempt == 1 for c in first.claims)
            assert first.claims[0].claim_id == first.claims[1].claim_id
            assert first.next_due_at is not None and first.next_due_at <= now
            rest = await store.claim(10, 30)
            assert {c.request_id for c in rest.claims} == {"r2", "r3", "r4"}
            # Only running rows are left; the next due moment is the earliest lease expiry.
            assert rest.next_due_at is not None and rest.next_due_at > now + 20
            assert (await store.claim(10, 30)).claims == []
            assert store.counts()[State.RUNNING] == 5

    run(body)


def test_claim_carries_what_dispatch_needs(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            new = delivery("a", status="ERROR")
            await store.insert(new)
            (claim,) = await claim_all(store)
            assert claim.status == "ERROR"
            assert claim.body == new.body
            assert claim.user_id == "user-1"
            assert claim.received_at == pytest.approx(new.received_at)
            assert claim.completed_callbacks == ()
            empty = await store.claim(5, 30)
            assert empty.claims == []

    run(body)


def test_every_claim_and_read_carries_its_own_body(store_url: str) -> None:
    """Bodies live in their own table: each is joined to its own delivery, never another's."""

    async def body() -> None:
        async with opened(store_url) as store:
            news = {rid: delivery(rid) for rid in ("a", "b", "c", "d", "e")}
            for new in news.values():
                await store.insert(new)
            assert len({new.body for new in news.values()}) == 5
            claims = await claim_all(store)
            assert {c.request_id: c.body for c in claims} == {
                rid: new.body for rid, new in news.items()
            }
            assert {r.request_id: r.body for r in store.list()} == {
                rid: new.body for rid, new in news.items()
            }
            assert store.get("c").body == news["c"].body  # type: ignore[union-attr]

    run(body)


def test_a_missing_body_row_does_not_break_the_claim(store_url: str) -> None:
    """A damaged store (a body row deleted by hand) fails neither claims nor reads."""

    async def body() -> None:
        async with opened(store_url) as store:
            await store.insert(delivery("a"))
            await store.insert(delivery("b"))
            with store.engine.begin() as conn:
                conn.exec_driver_sql(
                    "DELETE FROM falhook_bodies WHERE id = "
                    "(SELECT id FROM falhook_deliveries WHERE request_id = 'a')"
                )
            claims = {c.request_id: c.body for c in await claim_all(store)}
            assert claims == {"a": b"", "b": delivery("b").body}
            assert store.get("a").body == b""  # type: ignore[union-attr]
            assert {r.request_id for r in store.list()} == {"a", "b"}

    run(body)


def test_expired_lease_is_retaken_with_attempts_plus_one(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            await store.insert(delivery("a"))
            (first,) = await claim_all(store, lease=0.3)
            assert (await store.claim(10, 0.3)).claims == []  # held while the lease runs
            await asyncio.sleep(0.4)
            (second,) = await claim_all(store, lease=30)
            assert second.request_id == "a"
            assert second.attempt == first.attempt + 1 == 2
            assert second.claim_id != first.claim_id
            row = store.get("a")
            assert row is not None and row.claim_id == second.claim_id

    run(body)


def test_renew_keeps_a_claim_past_its_original_lease(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            await store.insert(delivery("a"))
            (claim,) = await claim_all(store, lease=0.3)
            assert await store.renew(claim, 30) is True
            await asyncio.sleep(0.4)
            assert (await store.claim(10, 30)).claims == []
            assert await store.finish(claim) is True

    run(body)


def test_a_taken_over_claim_is_fenced_out(store_url: str) -> None:
    """A worker whose lease was retaken can neither renew nor settle: nothing changes."""

    async def body() -> None:
        async with opened(store_url) as store:
            await store.insert(delivery("a"))
            (stale,) = await claim_all(store, lease=0.2)
            await asyncio.sleep(0.3)
            (current,) = await claim_all(store, lease=30)
            before = store.get("a")
            assert before is not None and before.claim_id == current.claim_id
            assert await store.renew(stale, 30) is False
            assert await store.finish(stale, ["cb"]) is False
            assert await store.reschedule(stale, time.time() + 60, "stale", ["cb"]) is False
            assert await store.bury(stale, "stale") is False
            assert store.get("a") == before  # not a single column changed
            # The current holder is unaffected.
            assert await store.renew(current, 30) is True
            assert await store.finish(current, ["cb"]) is True
            done = store.get("a")
            assert done is not None and done.state is State.DONE
            assert done.completed_callbacks == ("cb",)
            # And a finished claim cannot be written again either.
            assert await store.bury(current, "late") is False
            assert store.get("a") == done

    run(body)


def test_reschedule_respects_due_at_and_keeps_progress(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            await store.insert(delivery("a"))
            (claim,) = await claim_all(store)
            due = time.time() + 0.5
            assert await store.reschedule(claim, due, "try later", ["first"]) is True
            row = store.get("a")
            assert row is not None
            assert row.state is State.PENDING
            assert row.claim_id is None
            assert row.last_error == "try later"
            assert row.completed_callbacks == ("first",)
            batch = await store.claim(10, 30)
            assert batch.claims == []
            assert batch.next_due_at == pytest.approx(due)
            await asyncio.sleep(max(0.0, due - time.time()) + 0.05)
            (again,) = await claim_all(store)
            assert again.attempt == 2
            assert again.completed_callbacks == ("first",)

    run(body)


def test_bury_keeps_the_last_error(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            await store.insert(delivery("a"))
            (claim,) = await claim_all(store)
            assert await store.bury(claim, "ValueError: nope", ["x"]) is True
            row = store.get("a")
            assert row is not None
            assert row.state is State.DEAD
            assert row.last_error == "ValueError: nope"
            assert row.completed_callbacks == ("x",)
            assert row.finished_at is not None
            assert row.claim_id is None
            assert await claim_all(store) == []

    run(body)


# -- operator actions: replay, prune, counts ---------------------------------------------


async def _settled(store: Store) -> None:
    """a: done, b: dead, c: pending, d: running."""
    now = time.time()
    for i, rid in enumerate("abcd"):
        await store.insert(delivery(rid, received_at=now - 10 + i))
    claims = {c.request_id: c for c in (await store.claim(2, 30)).claims}
    assert set(claims) == {"a", "b"}
    assert await store.finish(claims["a"], ["cb"])
    assert await store.bury(claims["b"], "boom")
    (running,) = (await store.claim(1, 30)).claims
    assert running.request_id == "c"
    assert await store.reschedule(running, time.time() + 600, "later")
    (running,) = (await store.claim(1, 30)).claims
    assert running.request_id == "d"


def test_replay_requeues_done_and_dead_only_and_is_idempotent(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            await _settled(store)
            assert store.replay(["a", "b", "c", "d", "zz"]) == {
                "a": State.DONE,
                "b": State.DEAD,
            }
            assert store.replay(["a", "b", "c", "d"]) == {}  # twice queues once
            for rid in "ab":
                row = store.get(rid)
                assert row is not None
                assert row.state is State.PENDING
                assert row.attempts == 0
                assert row.completed_callbacks == ()
                assert row.finished_at is None
            c = store.get("c")
            assert c is not None and c.state is State.PENDING and c.last_error == "later"
            d = store.get("d")
            assert d is not None and d.state is State.RUNNING
            claimed = {c.request_id: c.attempt for c in await claim_all(store)}
            assert claimed == {"a": 1, "b": 1}

    run(body)


def test_replay_by_state(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            await _settled(store)
            assert store.replay(states=[State.DEAD]) == {"b": State.DEAD}
            assert store.replay(states=[State.PENDING, State.RUNNING]) == {}
            assert store.get("a").state is State.DONE  # type: ignore[union-attr]

    run(body)


def test_prune_never_deletes_pending_or_running(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            await _settled(store)
            assert store.prune(0, states=[State.PENDING, State.RUNNING]) == 0
            assert store.prune(3600, states=[State.DONE, State.DEAD]) == 0  # too recent
            await asyncio.sleep(0.01)
            assert store.prune(0) == 1  # the default: done only
            assert store.get("a") is None
            assert store.prune(0, states=list(State)) == 1  # dead; never c or d
            assert store.get("b") is None
            assert {r.request_id for r in store.list()} == {"c", "d"}
            assert row_counts(store) == (2, 2)  # the pruned deliveries' bodies went too

    run(body)


def test_counts_retrying_and_the_oldest_due_age(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            assert store.counts() == dict.fromkeys(State, 0)
            assert store.oldest_pending_age() == 0.0
            await _settled(store)
            assert store.counts() == {
                State.PENDING: 1,
                State.RUNNING: 1,
                State.DONE: 1,
                State.DEAD: 1,
            }
            d = store.get("d")
            assert d is not None
            now = time.time()
            # a and b finished; c failed once and waits for its next attempt (retrying), so
            # the oldest that is due or running is d.
            assert store.oldest_pending_age(now) == pytest.approx(now - d.received_at)
            assert store.retrying(now) == 1
            assert [r.request_id for r in store.list(retrying_after=now)] == ["c"]
            listed = store.list(states=[State.DEAD], retrying_after=now)
            assert sorted(r.request_id for r in listed) == ["b", "c"]
            # Once c is due it is pending again, and the oldest.
            assert store.retrying(now + 601) == 0
            c = store.get("c")
            assert c is not None
            assert store.oldest_pending_age(now + 601) == pytest.approx(now + 601 - c.received_at)

    run(body)


def test_list_newest_first_with_filters(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            await _settled(store)
            assert [r.request_id for r in store.list()] == ["d", "c", "b", "a"]
            assert [r.request_id for r in store.list(limit=2)] == ["d", "c"]
            assert [r.request_id for r in store.list(states=[State.DONE, State.DEAD])] == [
                "b",
                "a",
            ]
            c = store.get("c")
            assert c is not None
            assert [r.request_id for r in store.list(since=c.received_at)] == ["d", "c"]

    run(body)


# -- concurrency -------------------------------------------------------------------------


def test_two_stores_never_claim_the_same_delivery(store_url: str) -> None:
    """Two Store instances (two writer connections) race to claim: each row goes once."""

    async def body() -> None:
        async with opened(store_url) as first, opened(store_url) as second:
            now = time.time()
            for i in range(300):
                await first.insert(delivery(f"r{i:03}", received_at=now - 1))

            async def drain(store: Store) -> list[str]:
                got: list[str] = []
                while True:
                    batch = await store.claim(7, 60)
                    if not batch.claims:
                        return got
                    got.extend(c.request_id for c in batch.claims)
                    # Let the other writer in: SQLite's busy handler backs off in sleeps,
                    # so without a pause one store could drain everything alone.
                    await asyncio.sleep(0.005)

            a, b = await asyncio.gather(drain(first), drain(second))
            assert not set(a) & set(b)
            assert len(a) + len(b) == 300
            assert set(a) | set(b) == {f"r{i:03}" for i in range(300)}
            assert a and b  # both really took part

    run(body)


def test_group_commit_500_concurrent_inserts_all_durable(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            ids = [f"g{i:03}" for i in range(500)]
            # Every id twice, all at once: exactly one of each pair is new.
            results = await asyncio.gather(*(store.insert(delivery(r)) for r in ids + ids))
            firsts, seconds = results[:500], results[500:]
            assert all(new != dup for new, dup in zip(firsts, seconds, strict=True))
            assert sum(results) == 500
            again = await asyncio.gather(*(store.insert(delivery(r)) for r in ids))
            assert not any(again)
        # A new Store (new connections) sees every row: they were committed, not cached.
        async with opened(store_url) as reopened:
            assert reopened.counts()[State.PENDING] == 500
            assert {r.request_id for r in reopened.list(limit=None)} == set(ids)

    run(body)


def test_inserts_wake_the_local_dispatcher(store_url: str) -> None:
    async def body() -> None:
        woken = asyncio.Event()
        async with opened(store_url, on_due=woken.set) as store:
            await store.insert(delivery("a"))
            await asyncio.wait_for(woken.wait(), 5)
            woken.clear()
            await store.insert(delivery("a"))  # a duplicate makes nothing due
            await store.claim(10, 30)
            await asyncio.sleep(0.05)
            assert not woken.is_set()

    run(body)


def test_insert_claimed_is_running_and_returns_its_claim(store_url: str) -> None:
    async def body() -> None:
        woken: list[bool] = []
        parsed = {"request_id": "a", "status": "OK"}
        async with opened(store_url, on_due=lambda: woken.append(True)) as store:
            claim = await store.insert_claimed(
                delivery("a"), "c-1", lease_seconds=30, parsed=parsed
            )
            assert claim is not None
            assert (claim.claim_id, claim.attempt, claim.status) == ("c-1", 1, "OK")
            assert claim.parsed is parsed
            assert claim.body == delivery("a").body
            row = store.get("a")
            assert row is not None
            assert (row.state, row.attempts, row.claim_id) == (State.RUNNING, 1, "c-1")
            assert row.due_at > time.time() + 20  # leased, not due for anyone else
            assert await claim_all(store) == []
            assert woken == []  # nothing became due for other dispatchers
            assert await store.finish(claim) is True
            assert store.get("a").state is State.DONE  # type: ignore[union-attr]

    run(body)


def test_an_intake_claims_lease_runs_from_its_commit_not_its_arrival(store_url: str) -> None:
    # Received long ago (a body read slowly, a commit queued behind others): the lease
    # must not have run out already when the row becomes visible to other replicas.
    async def body() -> None:
        async with opened(store_url) as store:
            old = delivery("slow", received_at=time.time() - 100)
            before = time.time()
            assert await store.insert_claimed(old, "c-1", lease_seconds=30) is not None
            row = store.get("slow")
            assert row is not None and row.due_at >= before + 30
            assert await claim_all(store) == []  # nobody else may take it meanwhile

    run(body)


def test_insert_claimed_duplicate_takes_no_claim(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            assert await store.insert(delivery("a"))
            assert await store.insert_claimed(delivery("a"), "c-2") is None
            row = store.get("a")
            assert row is not None
            assert (row.state, row.claim_id, row.attempts) == (State.PENDING, None, 0)
            assert row_counts(store) == (1, 1)

    run(body)


def test_insert_claimed_then_crash_is_retaken_when_the_lease_expires(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            # Stored claimed, and the claimant never ran it (the process died).
            await store.insert_claimed(delivery("a"), "dead-process-1", lease_seconds=0.2)
            deadline = time.monotonic() + 10
            claims: list[Claim] = []
            while not claims:
                assert time.monotonic() < deadline, "never retaken"
                claims = await claim_all(store)
                await asyncio.sleep(0.02)
            assert (claims[0].request_id, claims[0].attempt) == ("a", 2)
            assert claims[0].claim_id != "dead-process-1"
            stale = Claim("a", "dead-process-1", 1, "OK", b"", None, 0.0, ())
            assert await store.finish(stale) is False  # the dead claimant is fenced out

    run(body)


# -- the store when the database is not there ---------------------------------------------


def test_not_started_store_refuses_async_calls(store_url: str) -> None:
    async def body() -> None:
        store = Store(store_url)
        with pytest.raises(StoreUnavailableError):
            await store.insert(delivery("a"))

    run(body)


def test_unreachable_sqlite_store_raises_store_unavailable(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'x.db'}"

    async def body() -> None:
        async with opened(url) as store:
            with pytest.raises(StoreUnavailableError):
                await store.ping()
            with pytest.raises(StoreUnavailableError):
                await store.insert(delivery("a"))
            with pytest.raises(StoreUnavailableError):
                store.counts()
            (tmp_path / "no" / "such" / "dir").mkdir(parents=True)
            await store.ping()  # it comes back without a restart
            assert await store.insert(delivery("a")) is True

    run(body)


@pytest.mark.postgres
@requires_pg
def test_pg_database_created_after_start() -> None:
    """Store unreachable at start (no such database) → 503s; ready once it exists."""
    assert PG_URL is not None
    name = f"falhook_late_{int(time.time() * 1000)}"
    url = sa.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    admin = pg_admin()

    async def body() -> None:
        async with opened(url) as store:
            with pytest.raises(StoreUnavailableError):
                await store.ping()
            with pytest.raises(StoreUnavailableError):
                await store.insert(delivery("a"))
            with admin.connect() as conn:
                conn.exec_driver_sql(f"CREATE DATABASE {name}")
            await store.ping()
            assert await store.insert(delivery("a")) is True
            assert store.counts()[State.PENDING] == 1

    try:
        run(body)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


def _terminate_others(schema_url: str) -> int:
    """pg_terminate_backend every session on the schema's database except ours."""
    with pg_admin().connect() as conn:
        return len(
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                    "AND backend_type = 'client backend'"
                )
            ).all()
        )


@pytest.mark.postgres
@requires_pg
def test_pg_writer_survives_terminated_connections(pg_schema_url: str) -> None:
    """The writer discards a killed connection and the same call succeeds on a new one."""

    async def body() -> None:
        async with opened(pg_schema_url) as store:
            assert await store.insert(delivery("a")) is True
            store.counts()  # a pooled sync connection too
            for i in range(3):
                assert _terminate_others(pg_schema_url) >= 1
                # The batch fails on the dead connection and is re-run on a fresh one.
                assert await store.insert(delivery(f"b{i}")) is True
                assert store.counts()[State.PENDING] == 2 + i  # pre-ping replaces it
            claims = await claim_all(store)
            assert len(claims) == 4
            _terminate_others(pg_schema_url)
            results = await asyncio.gather(*(store.finish(c) for c in claims))
            assert all(results)
            assert store.counts()[State.DONE] == 4

    run(body)


def test_sqlite_wal_is_checkpointed_off_the_commit_path(tmp_path: Any) -> None:
    """The writer switches SQLite's inline checkpoints off; its checkpointer thread copies
    the WAL back into the database file instead, and nothing committed is lost."""
    path = tmp_path / "wal.db"

    async def body() -> None:
        async with opened(f"sqlite:///{path}") as store:
            await asyncio.gather(*(store.insert(delivery(f"r{i}")) for i in range(300)))
            start_size = path.stat().st_size
            deadline = time.monotonic() + 10
            # Checkpointed pages land in the main file: it grows past its empty size.
            while path.stat().st_size <= start_size:
                assert time.monotonic() < deadline, "the WAL was never checkpointed"
                await asyncio.sleep(0.02)
        async with opened(f"sqlite:///{path}") as reopened:
            assert reopened.counts()[State.PENDING] == 300

    run(body)


@pytest.mark.parametrize(
    ("sql", "order", "constants", "params", "expected"),
    [
        ("SELECT 7", [], {}, None, (7,)),
        ("SELECT ?", ["a"], {}, {"a": "x"}, ("x",)),
        ("SELECT ?, ?, ?", ["a", "k", "a"], {"k": 3}, {"a": 1}, (1, 3, 1)),
    ],
)
def test_compiled_statement_binds_by_position(
    sql: str,
    order: list[str],
    constants: dict[str, Any],
    params: dict[str, Any] | None,
    expected: tuple[Any, ...],
) -> None:
    """Names (repeated ones included) and the statement's constants map onto placeholders."""
    statement = Compiled(sql, order, constants)
    cursor = sqlite3.connect(":memory:").cursor()
    statement.execute(cursor, params)
    assert cursor.fetchone() == expected


def test_prune_batch_deletes_done_only_in_batches(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            await _settled(store)
            for i in range(5):  # five more done deliveries
                await store.insert(delivery(f"done-{i}"))
            for claim in (await store.claim(10, 30)).claims:
                assert await store.finish(claim)
            await asyncio.sleep(0.01)
            assert store.prune_batch(3600, 2) == 0  # none finished long enough ago
            assert store.prune_batch(0, 2) == 2
            assert store.prune_batch(0, 10) == 4  # the other done ones, "a" among them
            assert store.prune_batch(0, 10) == 0
            assert {r.request_id for r in store.list()} == {"b", "c", "d"}  # dead stays
            assert row_counts(store) == (3, 3)

    run(body)


@requires_pg
def test_prune_batch_runs_on_one_replica_at_a_time(pg_schema_url: str) -> None:
    from falhook.receiver.store.admin import PRUNE_LOCK_KEY

    async def body() -> None:
        async with opened(pg_schema_url) as store:
            await store.insert(delivery("x"))
            (claim,) = (await store.claim(1, 30)).claims
            assert await store.finish(claim)
            await asyncio.sleep(0.01)
            other = sa.create_engine(pg_schema_url)
            try:
                with other.connect() as conn, conn.begin():
                    conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": PRUNE_LOCK_KEY})
                    assert store.prune_batch(0, 10) is None  # another replica is pruning
                assert store.prune_batch(0, 10) == 1
            finally:
                other.dispose()

    run(body)


def test_the_signed_timestamp_is_kept_and_handed_to_claims(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            signed = dataclasses.replace(delivery("a"), signed_at=1_764_580_000)
            assert await store.insert(signed)
            assert await store.insert(delivery("b"))  # recovered or older: nothing signed
            assert store.get("a").signed_at == 1_764_580_000  # type: ignore[union-attr]
            assert store.get("b").signed_at is None  # type: ignore[union-attr]
            claims = {c.request_id: c for c in await claim_all(store)}
            assert (claims["a"].signed_at, claims["b"].signed_at) == (1_764_580_000, None)
            claim = await store.insert_claimed(
                dataclasses.replace(delivery("c"), signed_at=1_764_580_001), "c-1"
            )
            assert claim is not None and claim.signed_at == 1_764_580_001

    run(body)


@requires_pg
def test_pg_a_duplicate_racing_a_replicas_bury_still_rearms_it(pg_schema_url: str) -> None:
    # This replica found the duplicate (its insert conflicted) while another was burying
    # the delivery. Under READ COMMITTED the duplicate's update must wait for that bury and
    # re-arm what it wrote: as two statements ("if dead, revive", then "if in flight,
    # mark") the bury could commit between them, and the duplicate would do neither.
    from falhook.receiver.store.engine import make_engine
    from falhook.receiver.store.operations import _duplicate
    from falhook.receiver.store.statements import Statements
    from falhook.receiver.store.writer import Tx

    def blocked_on_a_lock() -> bool:
        with pg_admin().connect() as conn:
            waiting = conn.exec_driver_sql(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND position('falhook_deliveries' in query) > 0"
            ).scalar_one()
        return bool(waiting)

    async def running() -> None:
        async with opened(pg_schema_url) as store:
            await store.insert(delivery("a"))
            await claim_all(store)

    run(running)
    engine = make_engine(pg_schema_url)
    other, this = engine.raw_connection(), engine.raw_connection()
    try:
        other.cursor().execute(  # the other replica's bury, not yet committed
            "UPDATE falhook_deliveries SET state = 'dead', claim_id = NULL, finished_at = 1 "
            "WHERE request_id = 'a'"
        )
        tx = Tx(this.cursor(), Statements(engine.dialect))
        with ThreadPoolExecutor(1) as pool:
            duplicate = pool.submit(_duplicate, tx, "a")
            deadline = time.monotonic() + 10
            while not blocked_on_a_lock():
                assert time.monotonic() < deadline and not duplicate.done(), "never waited"
                time.sleep(0.01)
            other.commit()
            duplicate.result(timeout=10)
        this.commit()
        assert tx.due_now is True
        with engine.connect() as conn:
            row = conn.exec_driver_sql(
                "SELECT state, attempts, finished_at FROM falhook_deliveries"
            ).one()
        assert tuple(row) == (State.PENDING.value, 0, None)
    finally:
        other.close()
        this.close()
        engine.dispose()


def test_the_sync_apis_writes_refuse_a_deleted_database_file(tmp_path: Any) -> None:
    # The console's pause or replay after an `rm` under the receiver: refused, as the
    # writer's commits are, not confirmed into a file nobody will read again.
    path = tmp_path / "gone.db"

    async def body() -> None:
        async with opened(f"sqlite:///{path}") as store:
            await store.insert(delivery("a"))
            store.set_dispatch_paused(True, reason="before")  # fine while the file is there
            for suffix in ("", "-wal", "-shm"):
                (tmp_path / f"gone.db{suffix}").unlink(missing_ok=True)
            with pytest.raises(StoreUnavailableError, match="deleted or replaced"):
                store.set_dispatch_paused(False)
            with pytest.raises(StoreUnavailableError, match="deleted or replaced"):
                store.replay(["a"])

    run(body)


_IMMUTABLE_SCRIPT = """
import asyncio, subprocess, sys
from falhook.receiver.errors import StoreUnavailableError
from falhook.receiver.store import Store

path = sys.argv[1]
files = [path + s for s in ("", "-wal", "-shm")]

async def main() -> None:
    store = Store("sqlite:///" + path)
    store.start()
    try:
        store.set_dispatch_paused(True, reason="before")
        subprocess.run(["chattr", "+i", *files], check=True)
        try:
            store.set_dispatch_paused(False)
        except StoreUnavailableError as exc:
            print("refused:", exc)
        finally:
            subprocess.run(["chattr", "-i", *files], check=True)
    finally:
        await store.stop()

asyncio.run(main())
"""


def test_the_sync_apis_writes_refuse_immutable_files_without_a_crash(tmp_path: Any) -> None:
    # Writing through the -shm mapping of an immutable file is a SIGBUS: the whole process
    # (every delivery with it) would die of a console click. In a child process, so that a
    # crash fails this test instead of the test run.
    import subprocess
    import sys

    probe = tmp_path / "probe"
    probe.touch()
    if subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root and a filesystem with it)")
    subprocess.run(["chattr", "-i", str(probe)], check=True)
    result = subprocess.run(
        [sys.executable, "-c", _IMMUTABLE_SCRIPT, str(tmp_path / "imm.db")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "refused: the database file" in result.stdout and "not writable" in result.stdout


def test_text_with_nul_or_a_lone_surrogate_is_stored_as_column_text(store_url: str) -> None:
    raw = b'{"request_id": "nul", "status": "ERROR", "payload": null, "error": "a\\u0000b\\ud800"}'
    text = "a\x00b\ud800"
    assert column_text(text) == "a\ufffdb\ufffd" and column_text("plain") == "plain"
    assert column_text("\ud83d\ude00\x00") == "\U0001f600\ufffd"  # a pair is joined

    async def main() -> None:
        async with opened(store_url) as store:
            new = dataclasses.replace(delivery("nul", body=raw), error=column_text(text))
            assert await store.insert(new) is True
            stored = store.get("nul")
            assert stored is not None and stored.error == "a\ufffdb\ufffd"
            assert stored.body == raw  # the body keeps what was sent

    run(main)
