"""Attempt history: every dispatch attempt is kept, written with its outcome — on SQLite
and PostgreSQL alike (the store contract fixtures), and through a real dispatcher."""

from __future__ import annotations

import asyncio
import time

import sqlalchemy as sa

from falhook.receiver.models import ATTEMPTS, State
from falhook.receiver.registry import CallbackRegistry
from falhook.receiver.retry import RetryPolicy
from falhook.receiver.store.attempts import AttemptRecord
from tests.receiver import store_fixtures
from tests.receiver.store_fixtures import delivery
from tests.receiver.test_store import claim_all, opened

pg_schema_url = store_fixtures.pg_schema_url
store_url = store_fixtures.store_url


def record(attempt: int, error: str | None = None) -> AttemptRecord:
    return AttemptRecord(attempt, time.time(), 0.25, error)


def test_each_outcome_keeps_its_attempt(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            await store.insert(delivery("a"))
            (claim,) = await claim_all(store)
            due = time.time() + 0.05
            trace = "Traceback (most recent call last):\n  ...\nRuntimeError: down"
            assert await store.reschedule(
                claim, due, "RuntimeError: down", attempt=record(1, trace)
            )
            await asyncio.sleep(0.06)
            (claim,) = await claim_all(store)
            assert await store.bury(claim, "RuntimeError: still", attempt=record(2, "still"))
            store.replay(["a"])
            (claim,) = await claim_all(store)
            assert await store.finish(claim, attempt=record(1))
            attempts = store.attempts("a")
            assert [(a.attempt, a.outcome) for a in attempts] == [
                (1, "retry"),
                (2, "dead"),
                (1, "done"),  # after the replay, counting starts again
            ]
            assert attempts[0].error == trace and attempts[0].next_attempt_at == due
            assert attempts[0].duration_seconds == 0.25
            assert attempts[1].next_attempt_at is None and attempts[2].error is None
            assert store.attempts("missing") == []

    asyncio.run(body())


def test_a_lost_claim_writes_no_attempt(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            await store.insert(delivery("a"))
            (stale,) = await claim_all(store, lease=0.01)
            await asyncio.sleep(0.02)
            (current,) = await claim_all(store)  # the lease expired: taken over
            assert await store.finish(stale, attempt=record(1)) is False
            assert store.attempts("a") == []
            assert await store.finish(current, attempt=record(2)) is True
            assert [a.attempt for a in store.attempts("a")] == [2]

    asyncio.run(body())


def test_prune_deletes_the_attempts_with_their_delivery(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            for rid in ("old", "kept"):
                await store.insert(delivery(rid))
            for claim in await claim_all(store):
                await store.finish(claim, attempt=record(1))
            with store.engine.begin() as conn:
                conn.execute(
                    sa.text(
                        "UPDATE falhook_deliveries SET finished_at = 0 WHERE request_id = 'old'"
                    )
                )
            assert store.prune(3600, states=[State.DONE]) == 1
            assert store.attempts("old") == []
            assert len(store.attempts("kept")) == 1
            with store.engine.connect() as conn:
                assert conn.execute(sa.select(sa.func.count()).select_from(ATTEMPTS)).scalar() == 1

    asyncio.run(body())


def test_retention_pruning_deletes_the_attempts_too(store_url: str) -> None:
    async def body() -> None:
        async with opened(store_url) as store:
            await store.insert(delivery("old"))
            (claim,) = await claim_all(store)
            await store.finish(claim, attempt=record(1))
            with store.engine.begin() as conn:
                conn.execute(sa.text("UPDATE falhook_deliveries SET finished_at = 0"))
            assert store.prune_batch(3600, 100) == 1
            with store.engine.connect() as conn:
                assert conn.execute(sa.select(sa.func.count()).select_from(ATTEMPTS)).scalar() == 0

    asyncio.run(body())


def test_the_dispatcher_records_every_attempt_with_a_traceback(store_url: str) -> None:
    from falhook.receiver.dispatcher import Dispatcher

    calls: list[int] = []
    fail_times = 2

    def flaky(d: object) -> None:
        calls.append(1)
        if len(calls) <= fail_times:
            raise RuntimeError(f"downstream is down ({len(calls)})")

    async def body() -> None:
        registry = CallbackRegistry()
        registry.on_delivery(flaky)
        async with opened(store_url) as store:
            dispatcher = Dispatcher(
                store,
                registry,
                policy=RetryPolicy(max_attempts=5, base_delay=0.01, max_delay=0.02),
                lease_seconds=30,
                poll_seconds=0.05,
            )
            dispatcher.start()
            try:
                await store.insert(delivery("r"))
                deadline = time.monotonic() + 10
                while (row := store.get("r")) is None or row.state is not State.DONE:
                    assert time.monotonic() < deadline, row
                    await asyncio.sleep(0.02)
            finally:
                await dispatcher.stop()
            attempts = store.attempts("r")
            assert [(a.attempt, a.outcome) for a in attempts] == [
                (1, "retry"),
                (2, "retry"),
                (3, "done"),
            ]
            first = attempts[0]
            assert first.error is not None
            assert first.error.startswith("Traceback (most recent call last):")
            assert "in flaky" in first.error
            assert first.error.rstrip().endswith("RuntimeError: downstream is down (1)")
            assert first.next_attempt_at is not None
            assert first.started_at <= first.next_attempt_at
            assert all(a.duration_seconds >= 0 for a in attempts)

    asyncio.run(body())
