"""What operators read and change: queries on a connection, for the CLI, health and tests.

Each function takes an open SQLAlchemy connection (inside a transaction for the ones that
write); `Store` opens it and wraps driver errors. None of this is on the hot path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from falhook.receiver.models import State, StoredDelivery
from falhook.receiver.store import attempts
from falhook.receiver.store.operations import decode_callbacks
from falhook.receiver.store.statements import BODIES, TABLE

__all__ = [
    "PRUNE_LOCK_KEY",
    "counts",
    "get",
    "list_deliveries",
    "oldest_pending_age",
    "prune",
    "prune_batch",
    "replay",
]

# A delivery's state row with its body. Outer: a delivery whose body row is missing (a
# damaged store) still shows, body empty.
_WITH_BODY = sa.select(TABLE, BODIES.c.body).outerjoin(BODIES, BODIES.c.id == TABLE.c.id)
# Bodies deleted per statement by prune: well under SQLite's bound-parameter limit.
_PRUNE_CHUNK = 500
_ACTIVE = (State.PENDING.value, State.RUNNING.value)
_FINISHED = (State.DONE.value, State.DEAD.value)


def get(conn: sa.Connection, request_id: str) -> StoredDelivery | None:
    """One stored delivery, or None."""
    rows = _deliveries(conn, _WITH_BODY.where(TABLE.c.request_id == request_id))
    return rows[0] if rows else None


def list_deliveries(
    conn: sa.Connection,
    *,
    states: Sequence[State] = (),
    since: float | None = None,
    limit: int | None = 100,
) -> list[StoredDelivery]:
    """Stored deliveries, newest first, filtered by state and received time."""
    stmt = _WITH_BODY.order_by(TABLE.c.received_at.desc(), TABLE.c.request_id)
    if states:
        stmt = stmt.where(TABLE.c.state.in_([s.value for s in states]))
    if since is not None:
        stmt = stmt.where(TABLE.c.received_at >= since)
    if limit is not None:
        stmt = stmt.limit(limit)
    return _deliveries(conn, stmt)


def counts(conn: sa.Connection) -> dict[State, int]:
    """Number of deliveries in each state (every state present, zero if none)."""
    stmt = sa.select(TABLE.c.state, sa.func.count()).group_by(TABLE.c.state)
    result = dict.fromkeys(State, 0)
    for state, count in conn.execute(stmt):
        result[State(state)] = int(count)
    return result


def oldest_pending_age(conn: sa.Connection, now: float | None = None) -> float:
    """Seconds since the oldest not-yet-finished delivery was received (0 if none)."""
    stmt = sa.select(sa.func.min(TABLE.c.received_at)).where(TABLE.c.state.in_(_ACTIVE))
    oldest = conn.execute(stmt).scalar()
    return 0.0 if oldest is None else max(0.0, (now or time.time()) - float(oldest))


def replay(
    conn: sa.Connection,
    request_ids: Sequence[str] = (),
    *,
    states: Sequence[State] = (),
    since: float | None = None,
    notify: str | None = None,
) -> dict[str, State]:
    """Re-queue finished deliveries for dispatch now; return each one's previous state."""
    select = sa.select(TABLE.c.request_id, TABLE.c.state).where(TABLE.c.state.in_(_FINISHED))
    if request_ids:
        select = select.where(TABLE.c.request_id.in_(list(request_ids)))
    if states:
        select = select.where(TABLE.c.state.in_([s.value for s in states]))
    if since is not None:
        select = select.where(TABLE.c.received_at >= since)
    now = time.time()
    previous = {rid: State(state) for rid, state in conn.execute(select)}
    if previous:
        conn.execute(
            sa.update(TABLE)
            .where(TABLE.c.request_id.in_(list(previous)), TABLE.c.state.in_(_FINISHED))
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
        if notify is not None:
            conn.exec_driver_sql(notify)
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
    stmt = (
        sa.delete(TABLE)
        .where(TABLE.c.state.in_(allowed), TABLE.c.finished_at < cutoff)
        .returning(TABLE.c.id)
    )
    ids = [row[0] for row in conn.execute(stmt)]
    for start in range(0, len(ids), _PRUNE_CHUNK):
        chunk = ids[start : start + _PRUNE_CHUNK]
        conn.execute(sa.delete(BODIES).where(BODIES.c.id.in_(chunk)))
        attempts.delete_for(conn, chunk)
    return len(ids)


# Serialises retention pruning across replicas on PostgreSQL (any constant of our own).
PRUNE_LOCK_KEY = 0x66616C70  # "falp"


def prune_batch(conn: sa.Connection, older_than: float, limit: int) -> int | None:
    """Delete up to `limit` done deliveries finished more than `older_than` seconds ago,
    in the caller's transaction; the same rules as `prune` (done only). None when another
    replica is pruning now (PostgreSQL: one at a time)."""
    if conn.dialect.name == "postgresql":
        taken = conn.execute(sa.text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": PRUNE_LOCK_KEY})
        if not taken.scalar_one():
            return None
    cutoff = time.time() - older_than
    oldest = (
        sa.select(TABLE.c.id)
        .where(TABLE.c.state == State.DONE.value, TABLE.c.finished_at < cutoff)
        .limit(limit)
    )
    stmt = (
        sa.delete(TABLE)
        .where(TABLE.c.id.in_(oldest.scalar_subquery()), TABLE.c.state == State.DONE.value)
        .returning(TABLE.c.id)
    )
    ids = [row[0] for row in conn.execute(stmt)]
    if ids:
        conn.execute(sa.delete(BODIES).where(BODIES.c.id.in_(ids)))
        attempts.delete_for(conn, ids)
    return len(ids)


def _deliveries(conn: sa.Connection, stmt: sa.Select[Any]) -> list[StoredDelivery]:
    return [
        StoredDelivery(
            request_id=r.request_id,
            gateway_request_id=r.gateway_request_id,
            status=r.status,
            error=r.error,
            payload_error=r.payload_error,
            user_id=r.user_id,
            body=bytes(r.body) if r.body is not None else b"",
            received_at=r.received_at,
            state=State(r.state),
            attempts=r.attempts,
            due_at=r.due_at,
            claim_id=r.claim_id,
            last_error=r.last_error,
            completed_callbacks=decode_callbacks(r.completed_callbacks),
            updated_at=r.updated_at,
            finished_at=r.finished_at,
            source=r.source,
            signed_at=r.signed_at,
        )
        for r in conn.execute(stmt)
    ]
