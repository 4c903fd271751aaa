"""The dispatcher with plain ``def`` callbacks (run by its SyncRunner) against a real SQLite
store: each delivery once, failures retried, the concurrency cap, shutdown."""

from __future__ import annotations

import asyncio
import threading

from falhook.receiver import CallbackRegistry, Delivery, State
from tests.receiver.test_dispatcher import _new, _running, _state, _until


def test_many_deliveries_each_run_once_in_threads_off_the_loop(db_url: str) -> None:
    registry = CallbackRegistry()
    seen: list[str] = []
    threads: set[int] = set()
    lock = threading.Lock()

    @registry.on_delivery
    def record(delivery: Delivery) -> None:
        with lock:
            seen.append(delivery.request_id)
            threads.add(threading.get_ident())

    async def main() -> None:
        async with _running(db_url, registry, concurrency=8) as (store, _):
            await asyncio.gather(*(store.insert(_new(f"sync-{i}")) for i in range(60)))
            await _until(lambda: store.counts()[State.DONE] == 60)
        assert threading.get_ident() not in threads

    asyncio.run(main())
    assert sorted(seen) == sorted(f"sync-{i}" for i in range(60))


def test_a_raising_def_callback_is_retried_and_its_sibling_not_rerun(db_url: str) -> None:
    registry = CallbackRegistry()
    calls: list[tuple[str, int]] = []

    @registry.on_delivery
    def flaky(delivery: Delivery) -> None:
        calls.append(("flaky", delivery.attempt))
        if delivery.attempt < 3:
            raise RuntimeError(f"not yet ({delivery.attempt})")

    @registry.on_delivery
    def steady(delivery: Delivery) -> None:
        calls.append(("steady", delivery.attempt))

    async def main() -> None:
        async with _running(db_url, registry) as (store, _):
            await store.insert(_new("sync-flaky"))
            await _until(lambda: _state(store, "sync-flaky") is State.DONE)
            row = store.get("sync-flaky")
            assert row is not None and row.attempts == 3

    asyncio.run(main())
    assert calls == [("flaky", 1), ("steady", 1), ("flaky", 2), ("flaky", 3)]


def test_def_callbacks_never_exceed_the_concurrency_and_a_slow_one_blocks_nothing(
    db_url: str,
) -> None:
    registry = CallbackRegistry()
    lock = threading.Lock()
    release = threading.Event()
    running = 0
    peak = 0
    fast_done: list[str] = []

    @registry.on_delivery
    def work(delivery: Delivery) -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        try:
            if delivery.request_id == "sync-slow":
                release.wait(10)
            else:
                fast_done.append(delivery.request_id)
        finally:
            with lock:
                running -= 1

    async def main() -> None:
        async with _running(db_url, registry, concurrency=3) as (store, _):
            await store.insert(_new("sync-slow"))
            await _until(lambda: running == 1)
            # The slow one holds a slot and a thread; the other two slots keep working.
            await asyncio.gather(*(store.insert(_new(f"sync-fast-{i}")) for i in range(20)))
            await _until(lambda: len(fast_done) == 20)
            assert _state(store, "sync-slow") is State.RUNNING
            release.set()
            await _until(lambda: store.counts()[State.DONE] == 21)

    try:
        asyncio.run(main())
    finally:
        release.set()
    assert peak <= 3
