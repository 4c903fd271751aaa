"""The group-commit writers on a real SQLite file: one failing operation fails alone,
an unreachable store fails every operation at once, and claims reach the hook only
after their commit."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from falhook.receiver.errors import StoreUnavailableError
from falhook.receiver.store import Claim, Store
from falhook.receiver.store.checkpointer import Checkpointer
from falhook.receiver.store.engine import make_engine
from falhook.receiver.store.fileguard import FileGuard
from falhook.receiver.store.loop_writer import LoopWriter
from falhook.receiver.store.operations import op_insert
from falhook.receiver.store.writer import Tx
from tests.receiver.store_fixtures import delivery, pg_schema_url, store_url

__all__ = ["pg_schema_url", "store_url"]  # fixtures


def _store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'w.db'}")


def test_sqlite_uses_the_loop_writer(tmp_path: Path) -> None:
    async def body() -> None:
        store = _store(tmp_path)
        store.start()
        try:
            assert isinstance(store._writer, LoopWriter)
        finally:
            await store.stop()

    asyncio.run(body())


def test_a_failing_operation_fails_alone_and_the_rest_commit(tmp_path: Path) -> None:
    def broken(tx: Tx) -> None:
        tx.cur.execute("INSERT INTO no_such_table VALUES (1)")

    async def body() -> None:
        store = _store(tmp_path)
        store.start()
        try:
            # Queued before the writer runs, so they share one batch (one transaction).
            futures = [
                store._submit(broken),
                store._submit(op_insert(delivery("a"))),
            ]
            results = await asyncio.gather(*futures, return_exceptions=True)
            assert isinstance(results[0], StoreUnavailableError)
            assert results[1] is True
            assert store.get("a") is not None  # committed despite its neighbour's failure
            assert await store.insert(delivery("b")) is True  # the writer carries on
        finally:
            await store.stop()

    asyncio.run(body())


def test_an_unreachable_store_fails_every_queued_operation(tmp_path: Path) -> None:
    async def body() -> None:
        store = Store(f"sqlite:///{tmp_path / 'missing' / 'dir' / 'w.db'}")
        store.start()
        try:
            results = await asyncio.gather(
                *(store.insert(delivery(f"r{i}")) for i in range(5)), return_exceptions=True
            )
            assert all(isinstance(r, StoreUnavailableError) for r in results)
        finally:
            await store.stop()

    asyncio.run(body())


def test_the_due_hook_runs_before_the_inserts_resolve(tmp_path: Path) -> None:
    events: list[str] = []

    async def body() -> None:
        store = Store(f"sqlite:///{tmp_path / 'w.db'}", on_due=lambda: events.append("due"))
        store.start()
        try:
            await store.insert(delivery("a"))
            events.append("insert returned")
        finally:
            await store.stop()

    asyncio.run(body())
    assert events == ["due", "insert returned"]


def test_submitting_before_start_is_refused(tmp_path: Path) -> None:
    async def body() -> None:
        with pytest.raises(StoreUnavailableError):
            await _store(tmp_path).insert(delivery("a"))

    asyncio.run(body())


def test_the_wal_starts_over_under_steady_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints run beside a writer that never pauses; the WAL must still be rewound
    (not grow for as long as the load lasts), so it ends far smaller than all it held."""
    monkeypatch.setattr(Checkpointer, "INTERVAL", 0.02)
    body = b"x" * 2048
    path = tmp_path / "w.db"

    async def body_() -> tuple[int, int]:
        store = Store(f"sqlite:///{path}")
        store.start()
        writer = store._writer
        assert isinstance(writer, LoopWriter)
        written = 0
        try:
            deadline = time.monotonic() + 30
            # Keep the writer busy until the checkpointer has copied several times over.
            while writer._checkpointer.checkpoints < 5 or written < 6000:
                assert time.monotonic() < deadline, "the checkpointer never ran"
                batch = [delivery(f"r{written + i}", body=body) for i in range(50)]
                assert all(await asyncio.gather(*(store.insert(d) for d in batch)))
                written += len(batch)
            wal_bytes = (path.parent / (path.name + "-wal")).stat().st_size
        finally:
            await store.stop()
        return written, wal_bytes

    written, wal_bytes = asyncio.run(body_())
    # Every delivery wrote at least its own 4 KiB page to the WAL; a WAL that was never
    # rewound would hold them all.
    assert wal_bytes < written * 4096 / 2, (written, wal_bytes)


def test_a_failing_commit_hook_does_not_leave_requests_waiting(store_url: str) -> None:
    """Both writers (the loop writer on SQLite, the thread writer on PostgreSQL)."""

    def broken_hook() -> None:
        raise RuntimeError("a bug in the hook")

    async def body() -> None:
        store = Store(store_url, on_due=broken_hook)
        store.start()
        try:
            inserted = store.insert(delivery("a"))
            assert await asyncio.wait_for(inserted, timeout=10) is True
            assert await store.insert(delivery("b")) is True  # the writer carries on
        finally:
            await store.stop()

    asyncio.run(body())


def test_work_submitted_while_stopping_is_refused_not_left_waiting(tmp_path: Path) -> None:
    async def body() -> None:
        store = _store(tmp_path)
        store.start()
        writer = store._writer
        assert await store.insert(delivery("a")) is True
        stopping = asyncio.create_task(store.stop())
        await asyncio.sleep(0)  # stop() has begun: it refuses new work from here on
        assert writer is not None
        with pytest.raises(StoreUnavailableError):
            await writer.submit(op_insert(delivery("b")))
        await stopping

    asyncio.run(body())


def test_a_batch_waits_for_another_process_s_write_lock_off_the_loop(tmp_path: Path) -> None:
    """Another connection holds the write lock: the worker thread waits for it, the loop
    stays free, and the insert commits once the lock is released."""
    import sqlite3

    async def body() -> None:
        store = _store(tmp_path)
        store.start()
        try:
            assert await store.insert(delivery("warm-up"))  # the writer's connection is open
            assert isinstance(store._writer, LoopWriter)
            holder = sqlite3.connect(tmp_path / "w.db", isolation_level=None)
            holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
            try:
                pending = asyncio.ensure_future(store.insert(delivery("behind-the-lock")))
                began = time.monotonic()
                for _ in range(20):  # the loop keeps running while the insert waits
                    await asyncio.sleep(0.01)
                # A busy wait on the loop would have stalled it for the 5 s lock timeout.
                assert time.monotonic() - began < 2.5 and not pending.done()
            finally:
                holder.execute("COMMIT")
                holder.close()
            assert await asyncio.wait_for(pending, 10)
        finally:
            await store.stop()

    asyncio.run(body())


class _Unwritable(FileGuard):
    """The writer's guard, told the files cannot be written (as `chattr +i` makes them),
    counting how often the checkpointer asked."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.refuse = True
        self.asked = 0

    def unwritable(self) -> str | None:
        self.asked += 1
        return "immutable, for the test" if self.refuse else None


def test_the_checkpointer_waits_while_the_files_cannot_be_written(tmp_path: Path) -> None:
    # A checkpoint writes through the -shm mapping; into unwritable files that is a SIGBUS.
    path = tmp_path / "c.db"
    engine = make_engine(f"sqlite:///{path}")
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_autocheckpoint=0")
        conn.exec_driver_sql("CREATE TABLE t (x)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        conn.commit()
    guard = _Unwritable(str(path))
    checkpointer = Checkpointer(engine, interval=0.01, guard=guard)
    checkpointer.committed()
    checkpointer.start()
    try:
        deadline = time.monotonic() + 10
        while guard.asked < 3:
            assert time.monotonic() < deadline, "the checkpointer never looked"
            time.sleep(0.01)
        assert checkpointer.checkpoints == 0  # asked three times, passed none
        guard.refuse = False
        while checkpointer.checkpoints < 1:
            assert time.monotonic() < deadline, "no checkpoint once the files were writable"
            time.sleep(0.01)
    finally:
        checkpointer.stop()
        engine.dispose()


def test_an_insert_its_request_stopped_waiting_for_is_handed_over_when_it_lands(
    store_url: str,
) -> None:
    async def body() -> None:
        store = Store(store_url)
        store.start()
        landed: asyncio.Queue[Claim | None] = asyncio.Queue()

        async def given_up(rid: str, claim_id: str) -> Claim | None:
            waiting = asyncio.ensure_future(
                store.insert_claimed(delivery(rid), claim_id, on_late=landed.put_nowait)
            )
            await asyncio.sleep(0)  # submitted, not yet committed
            waiting.cancel()  # the request timed out (answered 503) or its client left
            with pytest.raises(asyncio.CancelledError):
                await waiting
            return await asyncio.wait_for(landed.get(), 10)

        try:
            claim = await given_up("late", "c-1")
            assert claim is not None and (claim.claim_id, claim.attempt) == ("c-1", 1)
            assert await given_up("late", "c-2") is None  # a duplicate: nothing to run
            # Awaited to the end: the caller gets the claim, nothing is handed over.
            on_time = await store.insert_claimed(
                delivery("on-time"), "c-3", on_late=landed.put_nowait
            )
            assert on_time is not None and landed.empty()
        finally:
            await store.stop()

    asyncio.run(body())
