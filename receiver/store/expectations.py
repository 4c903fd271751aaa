"""Expectations: requests falhook expects a result for, and their recovery state.

An expectation is recorded by ``submit`` (falhook sent the request to fal's queue) or
``expect`` (it was sent elsewhere). The recovery poller (receiver/recovery/) claims due
expectations, asks fal's queue about them, and settles each in one of the final states.

States::

    waiting ──(recover-after passed, polled)──► polling ──► recovered   (fetched from the queue)
       │                                          │     └─► failed      (reason: 401, 404, gone…)
       └──────────(a webhook delivery came)───────┴─────► arrived
    waiting/polling ──(FALHOOK_EXPECT_TTL_SECONDS passed)──► expired

Claims work like the deliveries' (store.py): one statement takes due rows and stamps a
fresh ``claim_id`` with ``due_at`` as the lease expiry (PostgreSQL: ``FOR UPDATE SKIP
LOCKED``, so two replicas never take the same row); every later write says ``WHERE
claim_id = :mine``, so a poller whose lease was taken over changes nothing.

A webhook does not touch this table (its hot path stays one insert): the poller marks
expectations arrived in bulk (`op_sweep`) and checks each claimed one for a delivery.

Each operation is a function of a SQLAlchemy connection, run in a transaction of its own
(`Admin.run_sync`; `run` in a thread for the poller and the app): none of it is on the
webhook's hot path.
"""

from __future__ import annotations

import builtins
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from falhook.receiver.models import (
    BODIES,
    DELIVERIES,
    EXPECTATION_ACTIVE_PREDICATE,
    EXPECTATIONS,
    SOURCE_QUEUE,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from falhook.receiver.store.admin import SyncOp

__all__ = [
    "Changes",
    "Expectation",
    "ExpectationClaim",
    "ExpectationState",
    "Expectations",
    "NewExpectation",
    "Swept",
]


class ExpectationState(StrEnum):
    """Life of an expectation. The values are what the database holds."""

    WAITING = "waiting"  # recorded; not polled yet (recover-after not passed)
    POLLING = "polling"  # polled at least once; no result yet
    RECOVERED = "recovered"  # its result was fetched from the queue and stored
    ARRIVED = "arrived"  # its webhook came (nothing fetched)
    FAILED = "failed"  # cannot be recovered; `reason` says why
    EXPIRED = "expired"  # FALHOOK_EXPECT_TTL_SECONDS passed without a result

    @property
    def active(self) -> bool:
        return self in (ExpectationState.WAITING, ExpectationState.POLLING)


@dataclass(frozen=True, slots=True)
class NewExpectation:
    """What ``submit``/``expect`` record."""

    request_id: str
    endpoint_id: str
    status_url: str | None = None
    response_url: str | None = None
    origin: str = "expect"
    trace_context: str | None = None  # the traceparent of the submit (tracing on)


@dataclass(frozen=True, slots=True)
class Expectation:
    """One stored expectation, as operators and the poller see it."""

    request_id: str
    endpoint_id: str
    status_url: str | None
    response_url: str | None
    origin: str
    state: ExpectationState
    reason: str | None
    created_at: float
    expires_at: float
    due_at: float
    polls: int
    queue_status: str | None
    completed_at: float | None
    queue_error: str | None
    claim_id: str | None
    updated_at: float
    finished_at: float | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Expectation:
        values = dict(zip(_COLUMNS, row, strict=False))
        values["state"] = ExpectationState(values["state"])
        return cls(**values)


# An Expectation's fields, the table's columns in that order.
_COLUMNS = tuple(f.name for f in fields(Expectation))


@dataclass(frozen=True, slots=True)
class ExpectationClaim:
    """An expectation claimed by a poller; `delivered` is the source of a stored delivery
    of its request ("webhook"/"queue"), or None when none is stored yet."""

    expectation: Expectation
    claim_id: str
    delivered: str | None

    @property
    def request_id(self) -> str:
        return self.expectation.request_id


@dataclass(frozen=True, slots=True)
class Swept:
    """What a sweep settled: request_id → new state."""

    settled: dict[str, ExpectationState]


e = EXPECTATIONS.c
d = DELIVERIES.c
_ACTIVE = sa.text(f"({EXPECTATION_ACTIVE_PREDICATE})")  # as the partial index states it
# The source of the expected request's stored delivery, if any. Correlated by name:
# SQLite writes RETURNING columns unqualified, which would make a Core correlation
# compare the delivery's request_id with itself.
_DELIVERED = (
    sa.select(d.source)
    .where(d.request_id == sa.literal_column(f"{EXPECTATIONS.name}.request_id"))
    .scalar_subquery()
)
_SETTLED_STATE = sa.case(
    (_DELIVERED == SOURCE_QUEUE, "recovered"), else_="arrived"
)  # ExpectationState.RECOVERED / ARRIVED


# INSERT … ON CONFLICT DO NOTHING: each dialect has its own construct for it.
_INSERTS: dict[str, Callable[[sa.Table], Any]] = {
    "sqlite": sqlite.insert,
    "postgresql": postgresql.insert,
}


def _mine(claim: ExpectationClaim) -> tuple[Any, ...]:
    """Fenced: only the holder of the claim writes."""
    return (e.request_id == claim.request_id, e.claim_id == claim.claim_id)


class Changes(TypedDict, total=False):
    """What a poll writes back to a claimed expectation (`op_update`), besides its state."""

    due_at: float | None  # next poll (active states); None keeps it
    reason: str | None
    polled: bool  # one more status poll made
    queue_status: str | None  # the status fal said; None keeps it
    completed_at: float | None  # when a poll first saw COMPLETED; kept once set
    queue_error: str | None  # a COMPLETED request's error (JSON); None keeps it


class Runner(Protocol):
    """What runs the operations: an `Admin` (the store commands) or a `Store`."""

    async def run(self, op: SyncOp) -> Any: ...

    def run_sync(self, op: SyncOp) -> Any: ...


class Expectations:
    """The expectations of one store: each operation in a transaction of its own, async
    (the app and the poller) or sync (the CLI, metrics, the console)."""

    def __init__(self, store: Runner) -> None:
        self.store = store

    # -- operations (functions of a connection) ------------------------------------------

    def op_add(self, new: NewExpectation, *, recover_after: float, ttl: float) -> SyncOp:
        """Record an expectation; True if it is now expected (new, or re-armed). An active
        or settled one keeps its state, and learns fal's URLs if it did not know them
        (``expect`` after ``submit`` elsewhere). A failed or expired one is expected again,
        due at once: expecting it again is how an operator retries it (a wrong key fixed)."""
        now = time.time()

        def op(conn: sa.Connection) -> bool:
            insert = _INSERTS[conn.dialect.name](EXPECTATIONS).values(
                request_id=new.request_id,
                endpoint_id=new.endpoint_id,
                status_url=new.status_url,
                response_url=new.response_url,
                origin=new.origin,
                state=ExpectationState.WAITING.value,
                created_at=now,
                expires_at=now + ttl,
                due_at=now + recover_after,
                polls=0,
                updated_at=now,
                trace_context=new.trace_context,
            )
            insert = insert.on_conflict_do_nothing(index_elements=["request_id"])
            if conn.execute(insert.returning(e.request_id)).first() is not None:
                return True
            this = e.request_id == new.request_id
            settled = e.state.in_([ExpectationState.FAILED.value, ExpectationState.EXPIRED.value])
            rearm = (
                sa.update(EXPECTATIONS)
                .where(this, settled)
                .values(
                    state=ExpectationState.WAITING.value,
                    reason=None,
                    polls=0,
                    due_at=now,
                    expires_at=now + ttl,
                    queue_status=None,
                    completed_at=None,
                    queue_error=None,
                    claim_id=None,
                    finished_at=None,
                    updated_at=now,
                    status_url=sa.func.coalesce(new.status_url, e.status_url),
                    response_url=sa.func.coalesce(new.response_url, e.response_url),
                )
            )
            if conn.execute(rearm).rowcount == 1:
                return True  # due now: a poller finds it at its next look (within 5 s)
            if new.status_url or new.response_url:
                conn.execute(
                    sa.update(EXPECTATIONS)
                    .where(this)
                    .values(
                        status_url=sa.func.coalesce(e.status_url, new.status_url),
                        response_url=sa.func.coalesce(e.response_url, new.response_url),
                        updated_at=now,
                    )
                )
            return False

        return op

    def op_sweep(self, *, since: float | None, ttl_reason: str) -> SyncOp:
        """Settle active expectations whose delivery is stored (arrived, or recovered when
        the delivery came from the queue), then expire those past their TTL.

        With `since`, only deliveries received since then are looked at (cheap: the
        received_at index); without, every active expectation is checked (at start). One
        claimed by a poller is left to it until its lease expires.
        """
        if since is None:
            which: Any = sa.exists().where(d.request_id == e.request_id)
        else:
            which = e.request_id.in_(sa.select(d.request_id).where(d.received_at >= since))

        def op(conn: sa.Connection) -> Swept:
            now = time.time()
            # One claimed under a live lease is its claimant's to settle (with what it
            # did: "fetched from fal's queue"), as it would be once the lease expired.
            unclaimed = sa.or_(e.claim_id.is_(None), e.due_at <= now)
            settle = (
                sa.update(EXPECTATIONS)
                .where(_ACTIVE, unclaimed, which)
                .values(state=_SETTLED_STATE, claim_id=None, finished_at=now, updated_at=now)
                .returning(e.request_id, e.state)
            )
            settled = {r[0]: ExpectationState(r[1]) for r in conn.execute(settle)}
            expire = (
                sa.update(EXPECTATIONS)
                .where(_ACTIVE, e.expires_at <= now)
                .values(
                    state=ExpectationState.EXPIRED.value,
                    reason=ttl_reason,
                    claim_id=None,
                    finished_at=now,
                    updated_at=now,
                )
                .returning(e.request_id, e.state)
            )
            settled.update({r[0]: ExpectationState(r[1]) for r in conn.execute(expire)})
            return Swept(settled)

        return op

    def op_claim(self, *, limit: int, lease_seconds: float) -> SyncOp:
        """Claim up to `limit` due active expectations for `lease_seconds`; returns the
        claims and the earliest due_at left (None if nothing is active)."""

        def op(conn: sa.Connection) -> tuple[list[ExpectationClaim], float | None]:
            now = time.time()
            claim_id = uuid.uuid4().hex
            due = sa.select(e.request_id).where(_ACTIVE, e.due_at <= now)
            due = due.order_by(e.due_at).limit(limit)
            if conn.dialect.name == "postgresql":
                due = due.with_for_update(skip_locked=True)
            claim = (
                sa.update(EXPECTATIONS)
                .where(e.request_id.in_(due.scalar_subquery()))
                .values(claim_id=claim_id, due_at=now + lease_seconds, updated_at=now)
                .returning(*(e[name] for name in _COLUMNS), _DELIVERED)
            )
            claims = [
                ExpectationClaim(Expectation.from_row(r[: len(_COLUMNS)]), claim_id, r[-1])
                for r in conn.execute(claim)
            ]
            next_due = conn.execute(sa.select(sa.func.min(e.due_at)).where(_ACTIVE)).scalar()
            return claims, next_due

        return op

    def op_update(
        self, claim: ExpectationClaim, state: ExpectationState, **changes: Unpack[Changes]
    ) -> SyncOp:
        """Write back a claimed expectation (fenced: False if the claim was lost).

        Active states reschedule it at `due_at`; final ones record `reason` and the time.
        """

        def op(conn: sa.Connection) -> bool:
            now = time.time()
            update = (
                sa.update(EXPECTATIONS)
                .where(*_mine(claim))
                .values(
                    state=state.value,
                    reason=changes.get("reason"),
                    due_at=sa.func.coalesce(changes.get("due_at"), e.due_at),
                    polls=e.polls + (1 if changes.get("polled") else 0),
                    queue_status=sa.func.coalesce(changes.get("queue_status"), e.queue_status),
                    completed_at=sa.func.coalesce(e.completed_at, changes.get("completed_at")),
                    queue_error=sa.func.coalesce(changes.get("queue_error"), e.queue_error),
                    claim_id=None,
                    updated_at=now,
                    finished_at=None if state.active else now,
                )
            )
            return bool(conn.execute(update).rowcount == 1)

        return op

    def op_settle_delivered(self, claim: ExpectationClaim, *, reason: str | None = None) -> SyncOp:
        """A delivery of the claimed request is stored: arrived, or recovered when it came
        from the queue (whichever replica stored it). Fenced like `op_update`."""

        def op(conn: sa.Connection) -> ExpectationState | None:
            now = time.time()
            settle = (
                sa.update(EXPECTATIONS)
                .where(*_mine(claim))
                .values(
                    state=_SETTLED_STATE,
                    reason=sa.func.coalesce(reason, e.reason),
                    claim_id=None,
                    updated_at=now,
                    finished_at=now,
                )
                .returning(e.state)
            )
            state = conn.execute(settle).scalar()
            return ExpectationState(state) if state is not None else None

        return op

    def op_mark(self, request_id: str, state: ExpectationState, reason: str | None) -> SyncOp:
        """Set an expectation's state regardless of claims (a payload_error delivery whose
        payload was fetched: recovered). False if it is not stored."""

        def op(conn: sa.Connection) -> bool:
            now = time.time()
            mark = (
                sa.update(EXPECTATIONS)
                .where(e.request_id == request_id)
                .values(
                    state=state.value,
                    reason=reason,
                    claim_id=None,
                    updated_at=now,
                    finished_at=None if state.active else now,
                )
            )
            return bool(conn.execute(mark).rowcount == 1)

        return op

    def op_release(self, claim_ids: Sequence[str]) -> SyncOp:
        """Give back claims not worked on (a stopping poller): due again at once."""

        def op(conn: sa.Connection) -> None:
            if claim_ids:
                release = sa.update(EXPECTATIONS).where(e.claim_id.in_(claim_ids))
                conn.execute(release.values(claim_id=None, due_at=time.time()))

        return op

    def op_fill_body(self, request_id: str, claim_id: str, body: bytes) -> SyncOp:
        """Replace a claimed delivery's body with one whose payload came from the queue (a
        ``payload_error`` delivery), so retries and replays see it too. Fenced by the
        delivery's claim; False if the claim was lost."""

        def op(conn: sa.Connection) -> bool:
            claimed = sa.select(d.id).where(d.request_id == request_id, d.claim_id == claim_id)
            fill = sa.update(BODIES).where(BODIES.c.id == claimed.scalar_subquery())
            return bool(conn.execute(fill.values(body=body)).rowcount == 1)

        return op

    def op_get(self, request_id: str) -> SyncOp:
        def op(conn: sa.Connection) -> Expectation | None:
            select = sa.select(*(e[name] for name in _COLUMNS))
            row = conn.execute(select.where(e.request_id == request_id)).first()
            return Expectation.from_row(row) if row else None

        return op

    # -- running ---------------------------------------------------------------------

    async def run(self, op: SyncOp) -> Any:
        """Run one operation in a thread, on a connection of the store's pool."""
        return await self.store.run(op)

    def run_sync(self, op: SyncOp) -> Any:
        """Run one operation on a connection of its own (checking, not migrating, the
        schema first: only `falhook serve` migrates)."""
        return self.store.run_sync(op)

    def add(self, new: NewExpectation, *, recover_after: float, ttl: float) -> bool:
        """Record an expectation (sync); True if new."""
        result: bool = self.run_sync(self.op_add(new, recover_after=recover_after, ttl=ttl))
        return result

    def get(self, request_id: str) -> Expectation | None:
        result: Expectation | None = self.run_sync(self.op_get(request_id))
        return result

    def list(
        self, *, states: Sequence[ExpectationState] = (), limit: int | None = 100
    ) -> builtins.list[Expectation]:
        """Expectations, newest first, optionally in some states only."""
        select = sa.select(*(e[name] for name in _COLUMNS))
        if states:
            select = select.where(e.state.in_([s.value for s in states]))
        select = select.order_by(e.created_at.desc(), e.request_id).limit(limit)

        def op(conn: sa.Connection) -> builtins.list[Expectation]:
            return [Expectation.from_row(r) for r in conn.execute(select)]

        result: builtins.list[Expectation] = self.run_sync(op)
        return result

    def counts(self) -> dict[ExpectationState, int]:
        """Expectations in each state (every state present, zero if none)."""

        def op(conn: sa.Connection) -> dict[ExpectationState, int]:
            counts = dict.fromkeys(ExpectationState, 0)
            by_state = sa.select(e.state, sa.func.count()).group_by(e.state)
            for state, count in conn.execute(by_state):
                counts[ExpectationState(state)] = int(count)
            return counts

        result: dict[ExpectationState, int] = self.run_sync(op)
        return result
