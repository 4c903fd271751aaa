"""What operators read and change: the store's sync API, SQLAlchemy Core on a connection.

`Admin` runs each call in a transaction of its own, on a connection from its engine's
pool: the store commands open one for their URL (`Admin.open`), and inside `falhook
serve` the `Store` is one (the console, the metrics gauges, the pruner, recovery's
expectation operations). None of this is on the hot path.
"""

from __future__ import annotations

import builtins
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa

from falhook.receiver.errors import StoreUnavailableError
from falhook.receiver.models import ATTEMPTS, BODIES, DELIVERIES, State
from falhook.receiver.store.attempts import StoredAttempt, list_attempts
from falhook.receiver.store.control import DispatchControl, read_control, write_control
from falhook.receiver.store.engine import NOTIFY_CHANNEL, brief, make_engine
from falhook.receiver.store.migrations import check_version, current_version
from falhook.receiver.store.records import StoredDelivery, decode_callbacks

__all__ = [
    "PRUNE_LOCK_KEY",
    "Admin",
    "SyncOp",
    "counts",
    "get",
    "list_deliveries",
    "oldest_pending_age",
    "prune",
    "prune_batch",
    "replay",
    "retrying",
    "retrying_condition",
]

_T = TypeVar("_T")
# An operator operation: runs in a transaction of its own on a SQLAlchemy connection.
SyncOp = Callable[[sa.Connection], Any]

d = DELIVERIES.c
# A StoredDelivery's fields as the deliveries table holds them, and its body. Outer: a
# delivery whose body row is missing (a damaged store) still shows, body empty.
_FIELDS = tuple(f.name for f in dataclasses.fields(StoredDelivery) if f.name != "body")
_WITH_BODY = sa.select(*(d[name] for name in _FIELDS), BODIES.c.body).outerjoin(
    BODIES, BODIES.c.id == d.id
)
# Ids per statement (bodies deleted by prune, deliveries re-queued by replay): well under
# SQLite's bound-parameter limit.
_CHUNK = 500
_FINISHED = (State.DONE.value, State.DEAD.value)


def get(conn: sa.Connection, request_id: str) -> StoredDelivery | None:
    """One stored delivery, or None."""
    rows = _deliveries(conn, _WITH_BODY.where(d.request_id == request_id))
    return rows[0] if rows else None


def list_deliveries(
    conn: sa.Connection,
    *,
    states: Sequence[State] = (),
    since: float | None = None,
    limit: int | None = 100,
    retrying_after: float | None = None,
) -> list[StoredDelivery]:
    """Stored deliveries, newest first, filtered by state and received time.

    `retrying_after` adds the pending deliveries that failed before and are due after that
    time (shown as retrying) to those of `states`."""
    stmt = _WITH_BODY
    wanted: list[sa.ColumnElement[bool]] = (
        [d.state.in_([s.value for s in states])] if states else []
    )
    if retrying_after is not None:
        wanted.append(retrying_condition(retrying_after))
    if wanted:
        stmt = stmt.where(sa.or_(*wanted))
    if since is not None:
        stmt = stmt.where(d.received_at >= since)
    stmt = stmt.order_by(d.received_at.desc(), d.request_id).limit(limit)
    return _deliveries(conn, stmt)


def counts(conn: sa.Connection) -> dict[State, int]:
    """Number of deliveries in each state (every state present, zero if none)."""
    result = dict.fromkeys(State, 0)
    for state, count in conn.execute(sa.select(d.state, sa.func.count()).group_by(d.state)):
        result[State(state)] = int(count)
    return result


def oldest_pending_age(conn: sa.Connection, now: float | None = None) -> float:
    """Seconds since the oldest delivery that is due or running was received (0 if none).

    A delivery waiting for a later attempt (retrying: a callback failed, or asked for
    ``Retry(after=…)``) is not counted: it is where it should be, not stuck."""
    now = now or time.time()
    due = sa.or_(
        d.state == State.RUNNING.value, sa.and_(d.state == State.PENDING.value, d.due_at <= now)
    )
    oldest = conn.execute(sa.select(sa.func.min(d.received_at)).where(due)).scalar()
    return 0.0 if oldest is None else max(0.0, now - float(oldest))


def retrying_condition(after: float) -> sa.ColumnElement[bool]:
    """Pending deliveries that failed before and are due after `after`: shown as retrying
    (state.shown_state says the same of one row)."""
    return sa.and_(d.state == State.PENDING.value, d.attempts > 0, d.due_at > after)


def retrying(conn: sa.Connection, now: float | None = None) -> int:
    """How many pending deliveries failed before and wait for a later attempt."""
    waiting = sa.select(sa.func.count()).where(retrying_condition(now or time.time()))
    return int(conn.execute(waiting).scalar() or 0)


def replay(
    conn: sa.Connection,
    request_ids: Sequence[str] = (),
    *,
    states: Sequence[State] = (),
    since: float | None = None,
) -> dict[str, State]:
    """Re-queue finished deliveries for dispatch now; return each one's previous state."""
    stmt = sa.select(d.request_id, d.state).where(d.state.in_(_FINISHED))
    if request_ids:
        stmt = stmt.where(d.request_id.in_(request_ids))
    if states:
        stmt = stmt.where(d.state.in_([s.value for s in states]))
    if since is not None:
        stmt = stmt.where(d.received_at >= since)
    previous = {rid: State(state) for rid, state in conn.execute(stmt)}
    now = time.time()
    ids = list(previous)
    for start in range(0, len(ids), _CHUNK):
        # The state is checked again: a delivery that changed meanwhile is left alone.
        conn.execute(
            sa.update(DELIVERIES)
            .where(d.request_id.in_(ids[start : start + _CHUNK]), d.state.in_(_FINISHED))
            .values(
                state=State.PENDING.value,
                attempts=0,
                due_at=now,
                claim_id=None,
                completed_callbacks=None,
                finished_at=None,
                updated_at=now,
            )
        )
    if previous and conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"NOTIFY {NOTIFY_CHANNEL}")  # dispatchers on every replica
    return previous


def prune(
    conn: sa.Connection, older_than: float, *, states: Sequence[State] = (State.DONE,)
) -> int:
    """Delete finished deliveries that finished more than `older_than` seconds ago."""
    allowed = [s.value for s in states if s.value in _FINISHED]
    if not allowed:
        return 0
    cutoff = time.time() - older_than
    # The state rows go first and say which bodies go with them: a delivery that changed
    # state meanwhile (a replay) is not deleted, so neither is its body.
    deleted = conn.execute(
        sa.delete(DELIVERIES).where(d.state.in_(allowed), d.finished_at < cutoff).returning(d.id)
    )
    ids = list(deleted.scalars())
    for start in range(0, len(ids), _CHUNK):
        _delete_rest(conn, ids[start : start + _CHUNK])
    return len(ids)


# Serialises retention pruning across replicas on PostgreSQL (any constant of our own).
PRUNE_LOCK_KEY = 0x66616C70  # "falp"


def prune_batch(conn: sa.Connection, older_than: float, limit: int) -> int | None:
    """Delete up to `limit` done deliveries finished more than `older_than` seconds ago,
    in the caller's transaction; the same rules as `prune` (done only). None when another
    replica is pruning now (PostgreSQL: one at a time)."""
    if conn.dialect.name == "postgresql":
        lock = sa.select(sa.func.pg_try_advisory_xact_lock(PRUNE_LOCK_KEY))
        if not conn.execute(lock).scalar():
            return None
    done = d.state == State.DONE.value
    batch = sa.select(d.id).where(done, d.finished_at < time.time() - older_than).limit(limit)
    deleted = conn.execute(
        sa.delete(DELIVERIES).where(d.id.in_(batch.scalar_subquery()), done).returning(d.id)
    )
    ids = list(deleted.scalars())
    if ids:
        _delete_rest(conn, ids)
    return len(ids)


def _delete_rest(conn: sa.Connection, delivery_ids: Sequence[int]) -> None:
    """The bodies and attempts of deleted deliveries (at most _CHUNK ids)."""
    conn.execute(sa.delete(BODIES).where(BODIES.c.id.in_(delivery_ids)))
    conn.execute(sa.delete(ATTEMPTS).where(ATTEMPTS.c.delivery_id.in_(delivery_ids)))


def _deliveries(conn: sa.Connection, stmt: sa.Select[Any]) -> list[StoredDelivery]:
    found = []
    for row in conn.execute(stmt):
        values = dict(zip(_FIELDS, row, strict=False))
        body = row[len(_FIELDS)]
        values["body"] = bytes(body) if body is not None else b""
        values["state"] = State(values["state"])
        values["completed_callbacks"] = decode_callbacks(values["completed_callbacks"])
        found.append(StoredDelivery(**values))
    return found


# -- the sync API ------------------------------------------------------------------------


class Admin:
    """The store's sync API: each call a transaction of its own, on a connection from
    `engine`'s pool. Database errors become StoreUnavailableError (one line)."""

    def __init__(self, engine: sa.Engine, *, owns_engine: bool = False) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self._owns_engine = owns_engine
        self._schema_ready = False

    @classmethod
    def open(cls, url: str) -> Admin:
        """For the store commands: `url`'s store, opened without migrating (`close` it)."""
        return cls(make_engine(url), owns_engine=True)

    def close(self) -> None:
        """Close the connections this Admin opened."""
        if self._owns_engine:
            self.engine.dispose()

    # -- running ---------------------------------------------------------------------

    def _prepare(self) -> None:
        """Before each query (not the schema check): Store migrates here."""

    def _query(self, query: Callable[..., _T], *args: Any, write: bool, **kwargs: Any) -> _T:
        self._prepare()
        return self._run(lambda conn: query(conn, *args, **kwargs), write=write)

    def _guard_files(self) -> None:
        """Before each write: Store refuses one its SQLite files cannot take (fileguard)."""

    def _run(self, op: Callable[[sa.Connection], _T], *, write: bool) -> _T:
        if write:
            self._guard_files()
        try:
            conn = self.engine.connect()
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as exc:
            raise StoreUnavailableError(f"cannot connect: {brief(exc)}") from exc
        try:
            with conn:
                if not write:
                    return op(conn)  # the read's snapshot ends with the connection
                with conn.begin():
                    return op(conn)
        except (sa.exc.DBAPIError, sa.exc.TimeoutError) as exc:  # the database's, not ours
            raise StoreUnavailableError(brief(exc)) from exc

    def run_sync(self, op: SyncOp) -> Any:
        """Run one operator operation (a function of a SQLAlchemy connection, e.g.
        expectations.py's) in a transaction of its own, committed."""
        self._prepare()  # a Store migrates
        if not self._schema_ready:
            # Only `falhook serve` creates or upgrades the schema; elsewhere it must be there.
            self.check_schema()
        return self._run(op, write=True)

    async def run(self, op: SyncOp) -> Any:
        """`run_sync` in a thread, for async callers."""
        import asyncio  # only async callers need it (the CLI is sync)

        return await asyncio.to_thread(self.run_sync, op)

    # -- the schema ------------------------------------------------------------------

    def schema_version(self) -> int:
        """The store's schema version as it is (0: no falhook tables), checking nothing."""
        return self._run(current_version, write=False)

    def check_schema(self) -> int:
        """Check, changing nothing, that the schema is the one this falhook writes:
        StoreSchemaError when there is none, or an older or newer one."""
        version = self.schema_version()
        check_version(version)
        self._schema_ready = True
        return version

    @property
    def schema_ready(self) -> bool:
        """The schema is known to be current (checked here, or migrated by the caller)."""
        return self._schema_ready

    def mark_schema_ready(self) -> None:
        """The owner migrated the schema (Store.migrate)."""
        self._schema_ready = True

    # -- queries ---------------------------------------------------------------------

    def get(self, request_id: str) -> StoredDelivery | None:
        """One stored delivery, or None."""
        return self._query(get, request_id, write=False)

    def attempts(self, request_id: str) -> builtins.list[StoredAttempt]:
        """A delivery's dispatch attempts, oldest first (empty if none, or no delivery)."""
        return self._query(list_attempts, request_id, write=False)

    def list(
        self,
        *,
        states: Sequence[State] = (),
        since: float | None = None,
        limit: int | None = 100,
        retrying_after: float | None = None,
    ) -> builtins.list[StoredDelivery]:
        """Stored deliveries, newest first, filtered by state and received time."""
        return self._query(
            list_deliveries,
            states=states,
            since=since,
            limit=limit,
            retrying_after=retrying_after,
            write=False,
        )

    def counts(self) -> dict[State, int]:
        """Number of deliveries in each state (every state present, zero if none)."""
        return self._query(counts, write=False)

    def oldest_pending_age(self, now: float | None = None) -> float:
        """Seconds since the oldest due or running delivery was received (0 if none)."""
        return self._query(oldest_pending_age, now, write=False)

    def retrying(self, now: float | None = None) -> int:
        """How many pending deliveries wait for a later attempt."""
        return self._query(retrying, now, write=False)

    def dispatch_control(self) -> DispatchControl:
        """The store-wide dispatch switch as it is now (paused or not, and why)."""
        return self._query(read_control, write=False)

    def set_dispatch_paused(
        self, paused: bool, *, reason: str | None = None, by: str | None = None
    ) -> DispatchControl:
        """Pause or resume dispatch for every replica on this store; return the new state."""
        return self._query(write_control, paused=paused, reason=reason, by=by, write=True)

    def replay(
        self,
        request_ids: Sequence[str] = (),
        *,
        states: Sequence[State] = (),
        since: float | None = None,
    ) -> dict[str, State]:
        """Re-queue finished deliveries for dispatch now; return each one's previous state.

        Idempotent: pending or running deliveries are left alone (and not returned), so
        replaying twice queues once. Attempts start again from zero.
        """
        return self._query(replay, request_ids, states=states, since=since, write=True)

    def prune(self, older_than: float, *, states: Sequence[State] = (State.DONE,)) -> int:
        """Delete finished deliveries that finished more than `older_than` seconds ago.

        Never deletes pending or running deliveries, whatever `states` says.
        """
        return self._query(prune, older_than, states=states, write=True)

    def prune_batch(self, older_than: float, limit: int) -> int | None:
        """One small transaction of retention pruning (done only, as `prune`); None when
        another replica is pruning (PostgreSQL)."""
        return self._query(prune_batch, older_than, limit, write=True)
