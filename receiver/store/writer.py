"""Group commit: many operations, one transaction, one fsync — and a future for each.

What both writers share lives here: the transaction an operation sees (`Tx`), the
connection holder, running a batch's operations, and the one-by-one fallback.

Request handlers hand the writer an operation (a function of the transaction's cursor)
and await its future. The writer runs every operation queued by then in one transaction,
commits once, and only then resolves the futures, so each request still answers only
after its own row is durable while concurrent requests share the cost of the commit.

Two strategies, one contract: `ThreadWriter` (thread_writer.py) for PostgreSQL, where a
statement is a network round trip; `LoopWriter` (loop_writer.py) for SQLite, where a
statement is microseconds of CPU.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import sqlalchemy as sa

from falhook.receiver.errors import StoreUnavailableError
from falhook.receiver.store.engine import brief, pooled_connection

__all__ = ["Connection", "Landed", "Op", "Tx", "Writer", "WriterBase", "run_ops"]

log = logging.getLogger("falhook.store")


class Statements(Protocol):
    """The store's compiled statements, as far as the writers use them."""

    notify: str | None  # NOTIFY replicas when a transaction made work due (PostgreSQL)


class Tx:
    """One writer transaction as its operations see it: the DBAPI cursor, the compiled
    statements (statements.Statements), and whether an operation made work due. Each
    transaction gets a fresh one."""

    __slots__ = ("cur", "due_now", "sql")

    def __init__(self, cur: Any, sql: Any) -> None:
        self.cur = cur
        self.sql = sql
        # An operation made work due now (a new insert, a revived dead delivery): only such
        # a transaction NOTIFYs the other replicas and wakes the local dispatcher. A NOTIFY
        # on every transaction (claims included) would make idle replicas wake each other.
        self.due_now = False


# An operation: runs inside a writer's transaction and returns its request's result.
Op = Callable[[Tx], Any]
Job = tuple[Op, "asyncio.Future[Any]"]
Outcome = tuple[bool, Any]  # (True, result) or (False, StoreUnavailableError)
Result = tuple[list[Outcome], bool]  # outcomes, whether work became due
OnDue = Callable[[], None]  # after a commit that made work due


def run_ops(cur: Any, sql: Any, ops: Sequence[Op]) -> tuple[list[Any], Tx]:
    """Run `ops` on one cursor, in order: their results and the transaction's report."""
    tx = Tx(cur, sql)
    return [op(tx) for op in ops], tx


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
        self._ensure_schema = ensure_schema
        self._fairy: Any = None

    def get(self) -> Any:
        """The driver connection; raises StoreUnavailableError if none can be had."""
        if self._fairy is None:
            self._ensure_schema()
            self._fairy = pooled_connection(self.engine)
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


def failure(exc: BaseException) -> Outcome:
    if isinstance(exc, StoreUnavailableError):
        return (False, exc)
    wrapped = StoreUnavailableError(brief(exc))
    wrapped.__cause__ = exc
    return (False, wrapped)


@dataclass(slots=True)  # not frozen: one is made per delivery, and frozen costs a µs
class Landed:
    """An operation whose outcome matters even once nobody awaits it: when its request
    was cancelled (a timeout, the client gone) before the outcome came, `on_late` gets
    it (the result, or None if the operation failed)."""

    op: Op
    on_late: Callable[[Any], None]

    def __call__(self, tx: Tx) -> Any:
        return self.op(tx)


def resolve(batch: Sequence[Job], outcomes: Sequence[Outcome]) -> None:
    for (op, future), (ok, value) in zip(batch, outcomes, strict=True):
        if future.done():  # the awaiting request was cancelled (the client went away)
            if isinstance(op, Landed):
                try:
                    op.on_late(value if ok else None)
                except Exception:
                    log.exception("handling an operation that finished late failed")
            continue
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class WriterBase:
    """What both strategies are given: the connection, the statements, the commit hook."""

    def __init__(
        self,
        connection: Connection,
        sql: Statements,
        *,
        on_due: OnDue | None,
        max_batch: int,
    ) -> None:
        self._connection = connection
        self._sql = sql
        self._on_due = on_due
        self._max_batch = max_batch

    def _committed_due(self, due: bool) -> None:
        # Called before the batch's requests are answered. A failing hook must not leave
        # them waiting forever: they are answered anyway, and the dispatcher's poll finds
        # the work the hook failed to announce.
        if due and self._on_due is not None:
            try:
                self._on_due()
            except Exception:
                log.exception("the commit hook failed")


def with_retries(transaction: Callable[[Sequence[Op]], Result], ops: Sequence[Op]) -> Result:
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
        return [failure(exc)] * len(ops), False
    except Exception:
        pass
    one_by_one = OneByOne(len(ops))
    for op in ops:
        try:
            one_by_one.add(transaction([op]))
        except Exception as exc:
            if one_by_one.fail(exc):
                break
    return one_by_one.result()


class OneByOne:
    """The bookkeeping of running a failed batch's operations one transaction each."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.outcomes: list[Outcome] = []
        self.due = False

    def add(self, result: Result) -> None:
        outcomes, due = result
        self.outcomes.extend(outcomes)
        self.due = self.due or due

    def fail(self, exc: Exception) -> bool:
        """Record a failed operation; True when no connection can be had, so the
        operations not yet run fail with it (trying each would multiply timeouts)."""
        if isinstance(exc, StoreUnavailableError):
            self.outcomes.extend([failure(exc)] * (self.count - len(self.outcomes)))
            return True
        self.outcomes.append(failure(exc))
        return False

    def result(self) -> Result:
        return self.outcomes, self.due
