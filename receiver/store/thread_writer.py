"""The PostgreSQL writer: a thread owns the connection and runs whole batches.

Each statement is a network round trip, which must not happen on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Sequence
from typing import Any

from falhook.receiver.errors import StoreUnavailableError
from falhook.receiver.store.writer import (
    Connection,
    Job,
    Op,
    Outcome,
    Result,
    Statements,
    WriterBase,
    resolve,
    run_ops,
    with_retries,
)

__all__ = ["ThreadWriter"]


class ThreadWriter(WriterBase):
    """Runs whole batches in one thread that owns the connection (PostgreSQL)."""

    def __init__(self, connection: Connection, sql: Statements, **options: Any) -> None:
        super().__init__(connection, sql, **options)
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="falhook-store", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            await asyncio.to_thread(thread.join)

    def submit(self, op: Op) -> asyncio.Future[Any]:
        if self._thread is None:
            raise StoreUnavailableError("the store is not started")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._jobs.put((op, future))
        return future

    def _run(self) -> None:
        stopping = False
        while not stopping:
            job = self._jobs.get()
            if job is None:
                break
            batch = [job]
            while len(batch) < self._max_batch:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stopping = True
                    break
                batch.append(job)
            outcomes, due = with_retries(self._transaction, [op for op, _ in batch])
            loop = self._loop
            assert loop is not None
            # RuntimeError: the loop is closed, so nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._done, batch, outcomes, due)
        self._connection.close()

    def _done(self, batch: Sequence[Job], outcomes: Sequence[Outcome], due: bool) -> None:
        self._committed_due(due)
        resolve(batch, outcomes)

    def _transaction(self, ops: Sequence[Op]) -> Result:
        conn = self._connection.get()
        try:
            cur = conn.cursor()
            results, tx = run_ops(cur, self._sql, ops)
            if tx.due_now and self._sql.notify is not None:
                cur.execute(self._sql.notify)  # delivered to LISTENers only if this commits
            conn.commit()
            cur.close()
        except Exception:
            self._connection.discard()
            raise
        return [(True, r) for r in results], tx.due_now
