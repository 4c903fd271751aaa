"""Group commit: many operations, one transaction, one fsync — and a future for each.

Request handlers hand the writer an operation (a function of a DBAPI cursor) and await
its future. The writer runs every operation queued by then in one transaction, commits
once, and only then resolves the futures, so each request still answers only after its
own row is durable while concurrent requests share the cost of the commit.

Two strategies, one contract:

- `ThreadWriter` (PostgreSQL): a thread owns the connection and runs whole batches.
  Each statement is a network round trip, which must not happen on the event loop.
- `LoopWriter` (SQLite): statements are microseconds of CPU, so they run on the event
  loop itself; only the edges of each transaction — taking the write lock (which may
  wait for another process) and the commit's fsync — go to a worker thread. Measured
  with bench/: a writer thread that runs every statement itself releases the GIL around
  each one and then waits up to a switch interval to get it back from the busy event
  loop, which made acknowledgements wait milliseconds for each statement in their batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import sqlalchemy as sa

from falhook.receiver.errors import StoreUnavailableError

__all__ = ["Connection", "LoopWriter", "Op", "ThreadWriter", "Writer"]

log = logging.getLogger("falhook.store")

# An operation: runs on the writer's cursor inside its batch transaction. The second
# argument is the store's compiled statements; an operation that made work due for
# dispatch sets ``sql.due_now = True`` (so replicas are told with NOTIFY, and the local
# dispatcher is woken once the batch is committed), and one that took a claim appends it
# to ``sql.claimed`` (handed over only once the batch is committed).
Op = Callable[[Any, Any], Any]
Job = tuple[Op, "asyncio.Future[Any]"]
Outcome = tuple[bool, Any]  # (True, result) or (False, StoreUnavailableError)
Result = tuple[list[Outcome], bool, list[Any]]  # outcomes, work became due, claims taken


class Statements(Protocol):
    due_now: bool  # an operation made work due (NOTIFY replicas, wake the dispatcher)
    claimed: list[Any]  # claims taken by operations, handed over after the commit
    notify: str | None


OnCommit = Callable[[bool, list[Any]], None]  # (work became due, claims taken)


class Writer(Protocol):
    def start(self) -> None: ...
    async def stop(self) -> None: ...
    def submit(self, op: Op) -> asyncio.Future[Any]: ...


class Connection:
    """The writer's one DBAPI connection: opened lazily, thrown away after any error.

    Never returned to the pool after an error: we cannot tell a healthy connection from
    one the server killed (restart, pg_terminate_backend, a cut network), and errors are
    rare enough that a fresh connection costs nothing.
    """

    def __init__(self, engine: sa.Engine, ensure_schema: Callable[[], object]) -> None:
        self.engine = engine
        self._engine = engine
        self._ensure_schema = ensure_schema
        self._fairy: Any = None

    def get(self) -> Any:
        """The driver connection; raises StoreUnavailableError if none can be had."""
        if self._fairy is None:
            self._ensure_schema()
            try:
                self._fairy = self._engine.raw_connection()
            except sa.exc.SQLAlchemyError as exc:
                raise StoreUnavailableError(f"cannot connect: {brief(exc)}") from exc
        return self._fairy.driver_connection

    def discard(self) -> None:
        fairy, self._fairy = self._fairy, None
        if fairy is None:
            return
        try:
            fairy.invalidate()
        except Exception:
            log.debug("could not invalidate a broken connection", exc_info=True)

    def close(self) -> None:
        fairy, self._fairy = self._fairy, None
        if fairy is not None:
            try:
                fairy.close()
            except Exception:
                log.debug("could not close the writer connection", exc_info=True)


def brief(exc: BaseException) -> str:
    """The first line of a (driver) error, for messages."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def failure(exc: BaseException) -> Outcome:
    if isinstance(exc, StoreUnavailableError):
        return (False, exc)
    wrapped = StoreUnavailableError(brief(exc))
    wrapped.__cause__ = exc
    return (False, wrapped)


def resolve(batch: Sequence[Job], outcomes: Sequence[Outcome]) -> None:
    for (_, future), (ok, value) in zip(batch, outcomes, strict=True):
        if future.done():  # the awaiting request was cancelled (the client went away)
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class _WriterBase:
    """What both strategies are given: the connection, the statements, the commit hook."""

    def __init__(
        self,
        connection: Connection,
        sql: Statements,
        *,
        on_commit: OnCommit | None,
        max_batch: int,
    ) -> None:
        self._connection = connection
        self._sql = sql
        self._on_commit = on_commit
        self._max_batch = max_batch


class ThreadWriter(_WriterBase):
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
            outcomes, due, claimed = _with_retries(self._transaction, [op for op, _ in batch])
            loop = self._loop
            assert loop is not None
            # RuntimeError: the loop is closed, so nobody is waiting any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._done, batch, outcomes, due, claimed)
        self._connection.close()

    def _done(
        self, batch: Sequence[Job], outcomes: Sequence[Outcome], due: bool, claimed: list[Any]
    ) -> None:
        # Hand over claims before waking the requests: the dispatcher owns them first.
        if (due or claimed) and self._on_commit is not None:
            self._on_commit(due, claimed)
        resolve(batch, outcomes)

    def _transaction(self, ops: Sequence[Op]) -> Result:
        conn = self._connection.get()
        sql = self._sql
        sql.due_now = False
        sql.claimed = []
        try:
            cur = conn.cursor()
            results = [op(cur, sql) for op in ops]
            if sql.due_now and sql.notify is not None:
                cur.execute(sql.notify)  # delivered to LISTENers only if this commits
            conn.commit()
            cur.close()
        except Exception:
            self._connection.discard()
            raise
        return [(True, r) for r in results], sql.due_now, sql.claimed


def _with_retries(transaction: Callable[[Sequence[Op]], Result], ops: Sequence[Op]) -> Result:
    """Run `ops` in one transaction; if that fails, run each alone on a fresh connection.

    A connection lost mid-batch (a server restart, pg_terminate_backend) or one bad
    operation must fail neither the others nor a request a reconnect would have saved.
    Re-running is safe: an insert that did commit reports a duplicate, and a fenced write
    that did commit reports a lost claim. When no connection can be had at all, every
    operation fails at once (retrying one by one would multiply connect timeouts).
    """
    try:
        return transaction(ops)
    except StoreUnavailableError as exc:
        return [failure(exc)] * len(ops), False, []
    except Exception:
        pass
    one_by_one = _OneByOne(len(ops))
    for op in ops:
        try:
            one_by_one.add(transaction([op]))
        except Exception as exc:
            if one_by_one.fail(exc):
                break
    return one_by_one.result()


class _OneByOne:
    """The bookkeeping of running a failed batch's operations one transaction each."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.outcomes: list[Outcome] = []
        self.due = False
        self.claimed: list[Any] = []

    def add(self, result: Result) -> None:
        outcomes, due, claimed = result
        self.outcomes.extend(outcomes)
        self.due = self.due or due
        self.claimed.extend(claimed)

    def fail(self, exc: Exception) -> bool:
        """Record a failed operation; True when no connection can be had, so the
        operations not yet run fail with it (trying each would multiply timeouts)."""
        if isinstance(exc, StoreUnavailableError):
            self.outcomes.extend([failure(exc)] * (self.count - len(self.outcomes)))
            return True
        self.outcomes.append(failure(exc))
        return False

    def result(self) -> Result:
        return self.outcomes, self.due, self.claimed


class LoopWriter(_WriterBase):
    """Runs statements on the event loop; the lock and the fsync in one worker thread (SQLite).

    Batches are sequential: while one commits, new operations queue and form the next.
    ``BEGIN IMMEDIATE`` is taken in the worker thread, so waiting for another process's
    write lock (a CLI replay, a second receiver on the same file) never blocks the loop;
    once it is held, no statement can wait for a lock.

    The pipeline is driven by plain callbacks, not a task awaiting the thread: the worker
    hands its result to the loop with one ``call_soon_threadsafe``, and that callback starts
    the next batch's commit before it wakes the requests of the last one. Measured with
    bench/: awaiting ``run_in_executor`` costs a second loop iteration per commit, and under
    load an iteration is many requests' verification — the next fsync started ~1 ms late.
    """

    def __init__(self, connection: Connection, sql: Statements, **options: Any) -> None:
        super().__init__(connection, sql, **options)
        self._pending: list[Job] = []
        self._busy = False  # a batch is on its way from its operations to its futures
        self._idle = asyncio.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._open: Any = None  # a connection whose transaction is begun, or None
        self._configured: Any = None  # the connection whose checkpoints we switched off
        self._fallback: asyncio.Task[None] | None = None
        self._stopping = False
        self._checkpointer = Checkpointer(connection.engine)

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
        sql = self._sql
        sql.due_now = False
        sql.claimed = []
        try:
            cur = conn.cursor()
            results = [op(cur, sql) for op, _ in batch]
            cur.close()
        except Exception as exc:
            self._abandon(conn)
            self._fall_back(batch, exc)
            return
        assert self._executor is not None
        self._executor.submit(
            self._commit_in_thread, conn, batch, results, sql.due_now, sql.claimed
        )

    def _committed(
        self,
        batch: list[Job],
        results: list[Any],
        due: bool,
        claimed: list[Any],
        next_conn: Any,
    ) -> None:
        self._open = next_conn
        self._hand_over(due, claimed)
        self._next_batch()  # the next fsync starts before these requests are answered
        resolve(batch, [(True, r) for r in results])

    def _hand_over(self, due: bool, claimed: list[Any]) -> None:
        # Claims before waking the requests: the dispatcher owns them first. A failing hook
        # must not leave the batch's requests waiting forever (they are answered anyway;
        # claims it dropped are retaken when their lease expires).
        if (due or claimed) and self._on_commit is not None:
            try:
                self._on_commit(due, claimed)
            except Exception:
                log.exception("the commit hook failed")

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

    def _commit_in_thread(
        self, conn: Any, batch: list[Job], results: list[Any], due: bool, claimed: list[Any]
    ) -> None:
        try:
            conn.commit()
        except Exception as exc:
            self._abandon(conn)
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
        self._post(self._committed, batch, results, due, claimed, next_conn)

    def _begin(self) -> Any:
        conn = self._connection.get()
        try:
            if conn is not self._configured:
                # Checkpoints move to the Checkpointer's thread, off the commit path.
                conn.execute("PRAGMA wal_autocheckpoint=0")
                self._configured = conn
            self._checkpointer.catch_up(conn)
            conn.execute("BEGIN IMMEDIATE")
        except Exception:
            self._connection.discard()
            raise
        return conn

    def _abandon(self, conn: Any) -> None:
        with contextlib.suppress(Exception):
            conn.rollback()
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
        one_by_one = _OneByOne(len(batch))  # the same fallback as `_with_retries`
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
        outcomes, due, claimed = one_by_one.result()
        self._hand_over(due, claimed)
        resolve(batch, outcomes)
        self._next_batch()

    async def _transaction(self, op: Op) -> Result:
        loop = asyncio.get_running_loop()
        conn = await loop.run_in_executor(self._executor, self._begin)
        sql = self._sql
        sql.due_now = False
        sql.claimed = []
        try:
            cur = conn.cursor()
            result = op(cur, sql)
            cur.close()
            await loop.run_in_executor(self._executor, self._commit_alone, conn)
        except BaseException:
            self._abandon(conn)
            raise
        return [(True, result)], sql.due_now, sql.claimed

    def _commit_alone(self, conn: Any) -> None:
        conn.commit()
        self._checkpointer.committed()


class Checkpointer:
    """Copies the SQLite WAL back into the database file from a thread of its own.

    With SQLite's default, the commit that grows the WAL past 1000 pages runs the
    checkpoint itself: every few hundred deliveries, one batch of acknowledgements would
    wait for a burst of writes and fsyncs (measured with bench/: p99 ~25 ms). PASSIVE
    checkpoints here never block the writer, and durability is unchanged: a commit is
    durable once its WAL frames are synced, checkpointed or not. Once a second (rather
    than every 0.2 s) measured as well or better: fewer fsyncs of the database file
    contending with the WAL's.

    A concurrent checkpoint alone never lets the WAL start over under steady load: SQLite
    rewinds the WAL only when a write transaction begins with every frame already copied,
    and by the time this thread is done the writer has appended more. The WAL then grew
    for as long as the load lasted (hundreds of MB in a minute), and every commit paid for
    extending the file (page zeroing, ~12% of the process's CPU in perf). So after each
    checkpoint the writer copies the few frames appended since, between two transactions
    (`catch_up`), and its next transaction rewinds the WAL. That makes one batch wait, so
    this thread first passes again until a pass finds only a few new frames: measured under
    bench/ load, the writer's catch-up went from 14-31 ms (~1,000 frames left after one
    pass) to typically 0.5-3 ms.
    """

    INTERVAL = 1.0
    MAX_PASSES = 6
    CATCH_UP_FRAMES = 64

    def __init__(self, engine: sa.Engine, interval: float | None = None) -> None:
        self._engine = engine
        self._interval = self.INTERVAL if interval is None else interval
        self._commits = 0
        self.checkpoints = 0  # completed by this thread
        self.catch_up_due = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def committed(self) -> None:
        self._commits += 1

    def catch_up(self, conn: Any) -> None:
        """On the writer's connection, between transactions: copy what the last checkpoint
        missed, so that the next transaction rewinds the WAL."""
        if not self.catch_up_due:
            return
        self.catch_up_due = False
        try:
            self._pass(conn)
        except Exception as exc:
            log.debug("WAL catch-up checkpoint failed: %s", brief(exc))

    def _pass(self, conn: Any) -> int:
        """One PASSIVE checkpoint; returns how many frames the WAL held when it began."""
        row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(row[1])

    def _converge(self, conn: Any) -> None:
        # Pass again while the writer appended much during the last pass, so that what is
        # left for the writer's own catch-up (which makes one batch wait) is small.
        frames = self._pass(conn)
        for _ in range(self.MAX_PASSES):
            more = self._pass(conn)
            if more < frames or more - frames <= self.CATCH_UP_FRAMES:
                break  # rewound meanwhile, or only a few frames appended
            frames = more
        self.checkpoints += 1
        self.catch_up_due = True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="falhook-checkpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        seen = 0
        fairy: Any = None
        while not self._stop.wait(self._interval):
            if self._commits == seen:
                continue
            seen = self._commits
            try:
                if fairy is None:
                    fairy = self._engine.raw_connection()
                self._converge(fairy.driver_connection)
            except Exception as exc:
                # The writer's own commits still succeed; the next round tries again.
                log.warning("WAL checkpoint failed: %s", brief(exc))
                if fairy is not None:
                    with contextlib.suppress(Exception):
                        fairy.invalidate()
                    fairy = None
        if fairy is not None:
            with contextlib.suppress(Exception):
                self._pass(fairy.driver_connection)
                fairy.close()
