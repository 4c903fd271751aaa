"""Dispatcher against a real SQLite store: leases renewed while callbacks run, shutdown
waits for running callbacks, Retry(after=…) honoured, successes remembered across tries."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

from falhook.receiver import CallbackRegistry, Delivery, Retry, RetryPolicy, State, Store
from falhook.receiver.dispatcher import Dispatcher, DispatchObserver
from falhook.receiver.store import NewDelivery
from falhook.verify.testing import fal_body
from tests.receiver.store_fixtures import pg_schema_url as pg_schema_url  # fixture
from tests.replicas.proxy import TcpProxy

T = TypeVar("T")


def _new(request_id: str) -> NewDelivery:
    now = time.time()
    return NewDelivery(
        request_id=request_id,
        gateway_request_id=request_id,
        status="OK",
        error=None,
        payload_error=None,
        user_id="user-test",
        body=fal_body(request_id),
        received_at=now,
    )


@asynccontextmanager
async def _running(
    db_url: str, registry: CallbackRegistry, **kwargs: Any
) -> AsyncIterator[tuple[Store, Dispatcher]]:
    woken: list[Dispatcher] = []
    store = Store(db_url, on_due=lambda: woken[0].wake() if woken else None)
    store.start()
    options: dict[str, Any] = {
        "policy": RetryPolicy(max_attempts=5, base_delay=0.05),
        "lease_seconds": 5.0,
        "poll_seconds": 0.2,
        "shutdown_timeout": 5.0,
        **kwargs,
    }
    dispatcher = Dispatcher(store, registry, **options)
    woken.append(dispatcher)  # wired as the receiver wires it: inserts wake it
    dispatcher.start()
    try:
        yield store, dispatcher
    finally:
        await dispatcher.stop()
        await store.stop()


async def _until(check: Callable[[], Awaitable[T | None] | T | None], within: float = 10) -> T:
    deadline = time.monotonic() + within
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result  # type: ignore[return-value]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def _state(store: Store, request_id: str) -> State | None:
    row = store.get(request_id)
    return row.state if row else None


def test_lease_is_renewed_while_a_long_callback_runs(db_url: str) -> None:
    registry = CallbackRegistry()
    started = asyncio.Event()
    release = asyncio.Event()
    calls = 0

    @registry.on_delivery
    async def long(delivery: Delivery) -> None:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()

    async def main() -> None:
        lease = 0.3
        async with _running(db_url, registry, lease_seconds=lease) as (store, _):
            await store.insert(_new("long"))
            await asyncio.wait_for(started.wait(), 10)
            first = store.get("long")
            assert first is not None and first.state is State.RUNNING
            # Several leases' worth of time: the claim must have been renewed, so nobody
            # else can take the delivery, and its lease expiry keeps moving forward.
            deadline = time.time() + 4 * lease
            while time.time() < deadline:
                stolen = await store.claim(10, lease)
                assert stolen.claims == []
                await asyncio.sleep(lease / 3)
            later = store.get("long")
            assert later is not None
            assert later.state is State.RUNNING
            assert later.claim_id == first.claim_id
            assert later.due_at > first.due_at
            release.set()
            await _until(lambda: _state(store, "long") is State.DONE)
            done = store.get("long")
            assert done is not None and done.attempts == 1
        assert calls == 1

    asyncio.run(main())


def test_shutdown_waits_for_running_callbacks(db_url: str) -> None:
    registry = CallbackRegistry()
    started = asyncio.Event()
    finished: list[str] = []

    @registry.on_delivery
    async def slowish(delivery: Delivery) -> None:
        started.set()
        await asyncio.sleep(0.5)  # the workload: a callback still running at shutdown
        finished.append(delivery.request_id)

    async def main() -> None:
        store = Store(db_url)
        store.start()
        dispatcher = Dispatcher(
            store,
            registry,
            policy=RetryPolicy(),
            lease_seconds=5.0,
            poll_seconds=0.1,
            shutdown_timeout=10.0,
        )
        dispatcher.start()
        await store.insert(_new("graceful"))
        await asyncio.wait_for(started.wait(), 10)
        await dispatcher.stop()
        assert finished == ["graceful"]
        assert _state(store, "graceful") is State.DONE
        await store.stop()

    asyncio.run(main())


def test_shutdown_cancels_callbacks_after_the_timeout_and_leaves_them_claimed(
    db_url: str,
) -> None:
    registry = CallbackRegistry()
    started = asyncio.Event()
    cancelled = asyncio.Event()

    @registry.on_delivery
    async def stuck(delivery: Delivery) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def main() -> None:
        store = Store(db_url)
        store.start()
        dispatcher = Dispatcher(
            store,
            registry,
            policy=RetryPolicy(),
            lease_seconds=5.0,
            poll_seconds=0.1,
            shutdown_timeout=0.2,
        )
        dispatcher.start()
        await store.insert(_new("stuck"))
        await asyncio.wait_for(started.wait(), 10)
        began = time.monotonic()
        await asyncio.wait_for(dispatcher.stop(), 10)
        assert time.monotonic() - began < 5
        assert cancelled.is_set()
        # Not recorded as done or failed: the lease expires and another worker retakes it.
        assert _state(store, "stuck") is State.RUNNING
        await store.stop()

    asyncio.run(main())


def test_retry_after_from_a_callback_is_honoured(db_url: str) -> None:
    registry = CallbackRegistry()
    attempts: list[int] = []

    @registry.on_delivery
    async def asks(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        if delivery.attempt == 1:
            raise Retry(after=0.1)

    async def main() -> None:
        # The policy alone would wait an hour; the callback asked for 0.1 s.
        policy = RetryPolicy(max_attempts=5, base_delay=3600.0)
        async with _running(db_url, registry, policy=policy) as (store, _):
            before = time.time()
            await store.insert(_new("retry-after"))
            await _until(lambda: _state(store, "retry-after") is State.DONE, within=10)
            assert attempts == [1, 2]
            assert time.time() - before >= 0.1

    asyncio.run(main())


def test_retry_after_is_stored_as_the_next_due_time(db_url: str) -> None:
    registry = CallbackRegistry()

    @registry.on_delivery
    async def later(delivery: Delivery) -> None:
        raise Retry(after=30.0)

    async def main() -> None:
        async with _running(db_url, registry) as (store, _):
            before = time.time()
            await store.insert(_new("retry-later"))

            def pending() -> Any:
                row = store.get("retry-later")
                return row if row and row.state is State.PENDING and row.attempts == 1 else None

            row = await _until(pending)
            assert before + 29 <= row.due_at <= time.time() + 31
            asked = "retry asked by the callback, after 30 s: callback asked to retry"
            assert row.last_error == asked

    asyncio.run(main())


def test_failures_back_off_then_go_dead_with_the_last_error(db_url: str) -> None:
    registry = CallbackRegistry()
    attempts: list[int] = []

    @registry.on_delivery
    def broken(delivery: Delivery) -> None:
        attempts.append(delivery.attempt)
        raise ValueError(f"broken on attempt {delivery.attempt}")

    async def main() -> None:
        policy = RetryPolicy(max_attempts=3, base_delay=0.02)
        async with _running(db_url, registry, policy=policy) as (store, _):
            await store.insert(_new("doomed"))
            await _until(lambda: _state(store, "doomed") is State.DEAD)
            row = store.get("doomed")
            assert row is not None
            assert row.attempts == 3
            assert row.last_error == "ValueError: broken on attempt 3"
        assert attempts == [1, 2, 3]

    asyncio.run(main())


def test_a_callback_that_succeeded_is_not_rerun_when_a_sibling_failed(db_url: str) -> None:
    registry = CallbackRegistry()
    calls: list[tuple[str, int]] = []

    @registry.on_delivery
    def save(delivery: Delivery) -> None:
        calls.append(("save", delivery.attempt))

    @registry.on_delivery
    async def notify(delivery: Delivery) -> None:
        calls.append(("notify", delivery.attempt))
        if delivery.attempt < 3:
            raise RuntimeError("notify down")

    async def main() -> None:
        async with _running(db_url, registry) as (store, _):
            await store.insert(_new("siblings"))
            await _until(lambda: _state(store, "siblings") is State.DONE)
            row = store.get("siblings")
            assert row is not None
            assert sorted(row.completed_callbacks) == sorted(registry.names)
        assert calls == [("save", 1), ("notify", 1), ("notify", 2), ("notify", 3)]

    asyncio.run(main())


def test_many_deliveries_each_run_once(db_url: str) -> None:
    registry = CallbackRegistry()
    seen: list[str] = []

    @registry.on_delivery
    async def record(delivery: Delivery) -> None:
        seen.append(delivery.request_id)

    async def main() -> None:
        async with _running(db_url, registry, concurrency=4) as (store, _):
            await asyncio.gather(*(store.insert(_new(f"many-{i}")) for i in range(50)))
            await _until(lambda: len(seen) >= 50)
            await _until(lambda: store.counts()[State.DONE] == 50)
        assert sorted(seen) == sorted(f"many-{i}" for i in range(50))

    asyncio.run(main())


def test_no_more_callbacks_run_at_once_than_the_concurrency(db_url: str) -> None:
    """The cap is on callbacks: a slot is free again once they return (its outcome is
    recorded afterwards), and never more than `concurrency` run together."""
    registry = CallbackRegistry()
    gate = asyncio.Event()
    running: list[str] = []
    peak = 0
    started: list[str] = []

    @registry.on_delivery
    async def held(delivery: Delivery) -> None:
        nonlocal peak
        running.append(delivery.request_id)
        started.append(delivery.request_id)
        peak = max(peak, len(running))
        await gate.wait()
        running.remove(delivery.request_id)

    async def main() -> None:
        async with _running(db_url, registry, concurrency=2) as (store, dispatcher):
            await asyncio.gather(*(store.insert(_new(f"cap-{i}")) for i in range(6)))
            await _until(lambda: len(started) == 2)
            assert dispatcher.free_slots == 0
            gate.set()  # from now on callbacks return at once
            await _until(lambda: store.counts()[State.DONE] == 6)
        assert sorted(started) == sorted(f"cap-{i}" for i in range(6))
        assert peak == 2

    asyncio.run(main())


def test_a_failing_observer_does_not_leak_a_slot(db_url: str) -> None:
    class Broken(DispatchObserver):
        def started(self, delivery: Delivery) -> None:
            raise RuntimeError("a bug in the metrics hook")

    registry = CallbackRegistry()
    registry.add(lambda d: None, name="noop")

    async def main() -> None:
        async with _running(db_url, registry, concurrency=1, observer=Broken()) as (
            store,
            dispatcher,
        ):
            await store.insert(_new("broken-observer"))
            await _until(lambda: _state(store, "broken-observer") is State.RUNNING)
            await _until(lambda: not dispatcher._tasks)
            assert dispatcher.free_slots == 1

    asyncio.run(main())


def test_reservations_count_against_concurrency_and_are_released(db_url: str) -> None:
    registry = CallbackRegistry()
    registry.add(lambda d: None, name="noop")

    async def body() -> None:
        async with _running(db_url, registry, concurrency=2) as (_, dispatcher):
            first = dispatcher.reserve()
            second = dispatcher.reserve()
            assert first and second and first != second
            assert dispatcher.reserve() is None  # both slots promised
            dispatcher.release(first)
            dispatcher.release(first)  # idempotent
            assert dispatcher.free_slots == 1
            dispatcher.release(second)
            assert dispatcher.free_slots == 2

    asyncio.run(body())


def test_a_delivery_inserted_claimed_is_dispatched_once_without_a_claim_round(
    db_url: str,
) -> None:
    registry = CallbackRegistry()
    seen: list[tuple[str, int]] = []
    registry.add(lambda d: seen.append((d.request_id, d.attempt)), name="record")

    async def body() -> None:
        async with _running(db_url, registry) as (store, dispatcher):
            claim_id = dispatcher.reserve()
            assert claim_id is not None
            try:
                claim = await store.insert_claimed(_new("a"), claim_id, lease_seconds=5)
            finally:
                dispatcher.release(claim_id)
            assert claim is not None
            dispatcher.adopt(claim)  # as the receiver's intake does
            await _until(lambda: _state(store, "a") is State.DONE)
            assert seen == [("a", 1)]
            assert dispatcher.free_slots == dispatcher.concurrency

    asyncio.run(body())


@pytest.mark.postgres
def test_an_outcome_is_recorded_once_the_store_is_back_within_the_lease(
    pg_schema_url: str,
) -> None:
    """A store outage while a callback runs costs seconds, not the whole lease."""
    parsed = sa.make_url(pg_schema_url)
    with TcpProxy((parsed.host or "127.0.0.1", parsed.port or 5432)) as proxy:
        url = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        registry = CallbackRegistry()
        entered = threading.Event()
        release = threading.Event()

        def slow(delivery: Delivery) -> None:
            entered.set()
            assert release.wait(10)

        registry.add(slow, name="slow")

        async def body() -> None:
            async with _running(url, registry, lease_seconds=60.0) as (store, _):
                await store.insert(_new("a"))
                await asyncio.to_thread(entered.wait, 10)
                proxy.refuse()  # the database goes away while the callback runs
                release.set()
                await asyncio.sleep(0.3)  # let the first attempts to record it fail
                proxy.resume()
                started = time.monotonic()
                await _until(lambda: _state(store, "a") is State.DONE, within=15)
                # Recorded as soon as the store answered again, not after the 60 s lease.
                assert time.monotonic() - started < 15

        asyncio.run(body())


def test_an_attempts_traceback_starts_with_the_users_code(db_url: str) -> None:
    registry = CallbackRegistry()

    def deep(delivery: Delivery) -> None:
        raise ValueError("bad input")

    @registry.on_delivery
    def broken(delivery: Delivery) -> None:  # a `def`: run through falhook's thread runner
        deep(delivery)

    async def main() -> None:
        policy = RetryPolicy(max_attempts=2, base_delay=0.02)
        async with _running(db_url, registry, policy=policy) as (store, _):
            await store.insert(_new("folded"))
            await _until(lambda: _state(store, "folded") is State.DEAD)
            first, second = store.attempts("folded")
        assert first.error is not None
        frames = [line for line in first.error.splitlines() if line.startswith('  File "')]
        assert frames and all(__file__ in frame for frame in frames)  # only the user's frames
        assert "in broken" in frames[0] and "in deep" in frames[-1]
        assert first.error.splitlines()[1].endswith("of falhook's own folded)")
        assert first.error.endswith("ValueError: bad input")  # the last line names the error
        assert "ValueError: bad input" in first.error
        assert second.error == first.error  # identical: shown once, "same as attempt 1"

    asyncio.run(main())


def test_a_retry_the_callback_asked_for_is_recorded_as_a_schedule(db_url: str) -> None:
    registry = CallbackRegistry()

    @registry.on_delivery
    async def later(delivery: Delivery) -> None:
        raise Retry(after=900, message="rate limited upstream")

    async def main() -> None:
        async with _running(db_url, registry) as (store, _):
            await store.insert(_new("scheduled"))
            await _until(lambda: store.attempts("scheduled"))
            [attempt] = store.attempts("scheduled")
        assert attempt.outcome == "retry"
        assert attempt.error == "retry asked by the callback, after 900 s: rate limited upstream"

    asyncio.run(main())
