"""The SQLite writer: statements on the event loop, the lock and the fsync in a thread.

Statements are microseconds of CPU, so they run on the event loop itself; only the
edges of each transaction — taking the write lock (which may wait for another process)
and the commit's fsync — go to a worker thread. Measured with bench/: a writer thread
that runs every statement itself releases the GIL around each one and then waits up to
a switch interval to get it back from the busy event loop, which made acknowledgements
wait milliseconds for each statement in their batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from falhook.receiver.errors import StoreUnavailableError
from falhook.receiver.store.checkpointer import Checkpointer
from falhook.receiver.store.fileguard import FileGuard, FilesUnwritableError
from falhook.receiver.store.writer import (
    Connection,
    Job,
    OneByOne,
    Op,
    Result,
    Statements,
    WriterBase,
    failure,
    resolve,
    run_ops,
)

__all__ = ["LoopWriter"]

log = logging.getLogger("falhook.store")


class LoopWriter(WriterBase):
    """Runs statements on the event loop; the lock and the fsync in one worker thread (SQLite).

    Batches are sequential: while one commits, new operations queue and form the next.
    ``BEGIN IMMEDIATE`` is taken in the worker thread, so waiting for another process's
    write lock (a CLI replay, a second receiver on the same file) never blocks the loop;
    once it is held, no statement can wait for a lock.

    The pipeline is driven by plain callbacks, not a task awaiting the thread: the worker
    hands its result to the loop with one ``call_soon_threadsafe``, and that callback starts
    the next batch's commit before it wakes the requests of the last one. Measured with
    bench/: awaiting ``run_in_executor`` costs a second loop iteration per commit, and under
    load an iteration is many requests' verification, so the next fsync started late.
    """

    def __init__(
        self,
        connection: Connection,
        sql: Statements,
        *,
        guard: FileGuard | None = None,
        **options: Any,
    ) -> None:
        super().__init__(connection, sql, **options)
        self._pending: list[Job] = []
        self._busy = False  # a batch is on its way from its operations to its futures
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._open: Any = None  # a connection whose transaction is begun, or None
        self._configured: Any = None  # the connection whose checkpoints we switched off
        # Only held: the event loop keeps weak references to tasks, so a fallback task
        # nobody references could be collected mid-run.
        self._fallback: asyncio.Task[None] | None = None
        self._stopping = False
        # Shared with the Store's own writes (console, CLI-like calls), when it passes one.
        self._guard = guard or FileGuard(connection.engine.url.database)
        self._checkpointer = Checkpointer(connection.engine, guard=self._guard)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="falhook-store")
        self._checkpointer.start()

    async def stop(self) -> None:
        # Refuse new work first: an operation submitted while we wait below would find no
        # worker to commit it, and its request would wait forever.
        self._stopping = True
        await self._idle.wait()
        await asyncio.to_thread(self._checkpointer.stop)
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(executor, self._close)
            executor.shutdown(wait=True)

    def submit(self, op: Op) -> asyncio.Future[Any]:
        loop = self._loop
        if self._executor is None or loop is None:
            raise StoreUnavailableError("the store is not started")
        if self._stopping:
            raise StoreUnavailableError("the store is stopping")
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((op, future))
        if not self._busy:
            # Not at once: operations submitted in this loop iteration join the batch.
            self._busy = True
            self._idle.clear()
            loop.call_soon(self._next_batch)
        return future

    # -- the pipeline: loop -> worker -> loop, one hop each way ------------------------

    def _next_batch(self) -> None:
        if not self._pending or self._executor is None:
            self._busy = False
            self._idle.set()
            return
        batch = self._pending[: self._max_batch]
        del self._pending[: self._max_batch]
        conn, self._open = self._open, None
        if conn is None:
            self._executor.submit(self._begin_in_thread, batch)
        else:
            self._execute(batch, conn)

    def _execute(self, batch: list[Job], conn: Any) -> None:
        """Run the batch's statements (on the loop), then send the commit to the worker."""
        try:
            cur = conn.cursor()
            results, tx = run_ops(cur, self._sql, [op for op, _ in batch])
            cur.close()
        except Exception as exc:
            self._abandon(conn)
            self._fall_back(batch, exc)
            return
        assert self._executor is not None
        self._executor.submit(self._commit_in_thread, conn, batch, results, tx.due_now)

    def _committed(
        self,
        batch: list[Job],
        results: list[Any],
        due: bool,
        next_conn: Any,
    ) -> None:
        self._open = next_conn
        self._committed_due(due)
        self._next_batch()  # the next fsync starts before these requests are answered
        resolve(batch, [(True, r) for r in results])

    # -- in the worker thread ----------------------------------------------------------

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        # RuntimeError: the loop is closed, so nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)

    def _begin_in_thread(self, batch: list[Job]) -> None:
        try:
            conn = self._begin()
        except Exception as exc:
            self._post(self._fall_back, batch, exc)
            return
        self._post(self._execute, batch, conn)

    def _commit_in_thread(self, conn: Any, batch: list[Job], results: list[Any], due: bool) -> None:
        try:
            self._guard.check()  # never commit (and acknowledge) into a deleted file
            conn.commit()
        except Exception as exc:
            self._abandon(conn, keep=isinstance(exc, FilesUnwritableError))
            self._post(self._fall_back, batch, exc)
            return
        self._checkpointer.committed()
        next_conn = None
        # More work is queued: take the lock for it on this same trip, unless a checkpoint
        # needs catching up first — then `_begin` does both, after these requests are answered.
        if self._pending and not self._checkpointer.catch_up_due:
            try:
                conn.execute("BEGIN IMMEDIATE")
                next_conn = conn
            except Exception:
                # The commit stands; the next batch will take the lock again on its own.
                log.debug("could not begin the next transaction", exc_info=True)
        self._post(self._committed, batch, results, due, next_conn)

    def _begin(self) -> Any:
        conn = self._connection.get()
        try:
            if conn is not self._configured:
                # Checkpoints move to the Checkpointer's thread, off the commit path.
                conn.execute("PRAGMA wal_autocheckpoint=0")
                self._configured = conn
            self._guard.opened()
            self._guard.check()  # before the -shm mapping is written through
            self._checkpointer.catch_up(conn)
            conn.execute("BEGIN IMMEDIATE")
        except FilesUnwritableError:
            raise  # the connection stays open (see FilesUnwritableError)
        except Exception:
            self._connection.discard()
            raise
        return conn

    def _abandon(self, conn: Any, *, keep: bool = False) -> None:
        with contextlib.suppress(Exception):
            conn.rollback()
        if not keep:
            self._connection.discard()

    def _close(self) -> None:
        if self._open is not None:
            with contextlib.suppress(Exception):
                self._open.rollback()
            self._open = None
        self._connection.close()

    # -- when a batch fails: each operation alone, so one bad operation fails alone ------

    def _fall_back(self, batch: list[Job], exc: Exception) -> None:
        if isinstance(exc, StoreUnavailableError):
            # No connection can be had: fail them all at once (one by one would multiply
            # connect timeouts).
            resolve(batch, [failure(exc)] * len(batch))
            self._next_batch()
            return
        assert self._loop is not None
        self._fallback = self._loop.create_task(self._one_by_one(batch))

    async def _one_by_one(self, batch: list[Job]) -> None:
        one_by_one = OneByOne(len(batch))  # the same fallback as `with_retries`
        try:
            for op, _ in batch:
                try:
                    one_by_one.add(await self._transaction(op))
                except Exception as exc:
                    if one_by_one.fail(exc):
                        break
        except asyncio.CancelledError:
            resolve(batch, [failure(StoreUnavailableError("the store stopped"))] * len(batch))
            raise
        outcomes, due = one_by_one.result()
        self._committed_due(due)
        resolve(batch, outcomes)
        self._next_batch()

    async def _transaction(self, op: Op) -> Result:
        loop = asyncio.get_running_loop()
        conn = await loop.run_in_executor(self._executor, self._begin)
        try:
            cur = conn.cursor()
            results, tx = run_ops(cur, self._sql, [op])
            cur.close()
            await loop.run_in_executor(self._executor, self._commit_alone, conn)
        except BaseException as exc:
            self._abandon(conn, keep=isinstance(exc, FilesUnwritableError))
            raise
        return [(True, results[0])], tx.due_now

    def _commit_alone(self, conn: Any) -> None:
        self._guard.check()
        conn.commit()
        self._checkpointer.committed()
