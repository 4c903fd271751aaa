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

Plain SQL with positional parameters, shared by the writer (async) and the CLI (sync):
none of it is on the webhook's hot path, and each statement reads best written out.
"""

from __future__ import annotations

import builtins
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from falhook.receiver.state import SOURCE_QUEUE
from falhook.receiver.store.dbapi import Op, Tx, sql_for

__all__ = [
    "ACTIVE_PREDICATE",
    "Expectation",
    "ExpectationClaim",
    "ExpectationState",
    "Expectations",
    "NewExpectation",
    "Swept",
]

TABLE_NAME = "falhook_expectations"
# Spelled exactly as the partial index ix_falhook_expectations_active_due (migration 4)
# states it: a planner can only use a partial index whose predicate the query implies.
ACTIVE_PREDICATE = "state = 'waiting' OR state = 'polling'"


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


_COLUMNS = (
    "request_id",
    "endpoint_id",
    "status_url",
    "response_url",
    "origin",
    "state",
    "reason",
    "created_at",
    "expires_at",
    "due_at",
    "polls",
    "queue_status",
    "completed_at",
    "queue_error",
    "claim_id",
    "updated_at",
    "finished_at",
)
_SELECT = ", ".join(_COLUMNS)


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


_DELIVERED = "(SELECT d.source FROM falhook_deliveries d WHERE d.request_id = {t}.request_id)"
_SETTLED_STATE = (
    f"CASE WHEN {_DELIVERED.format(t=TABLE_NAME)} = '{SOURCE_QUEUE}' "
    f"THEN '{ExpectationState.RECOVERED.value}' ELSE '{ExpectationState.ARRIVED.value}' END"
)


class Runner(Protocol):
    """What runs the operations: a `Store` (through its writer, or a pooled connection),
    or the store commands' `Admin` (the driver's own connection)."""

    dialect: str

    async def run(self, op: Op) -> Any: ...

    def run_sync(self, op: Op) -> Any: ...


class Expectations:
    """The expectations of one store: async operations through its writer (the app and
    the poller), and sync ones on a connection of their own (the CLI, metrics). The CLI
    passes an `Admin` (no writer, no SQLAlchemy) instead of a `Store`."""

    def __init__(self, store: Runner) -> None:
        self.store = store
        self.dialect = store.dialect

    # -- operations (run in the writer's transaction, or on a sync connection) --------

    def op_add(self, new: NewExpectation, *, recover_after: float, ttl: float) -> Op:
        """Record an expectation; True if it is now expected (new, or re-armed). An active
        or settled one keeps its state, and learns fal's URLs if it did not know them
        (``expect`` after ``submit`` elsewhere). A failed or expired one is expected again,
        due at once: expecting it again is how an operator retries it (a wrong key fixed)."""
        now = time.time()
        insert = sql_for(
            f"INSERT INTO {TABLE_NAME} ({_SELECT}, trace_context) "
            "VALUES (?, ?, ?, ?, ?, ?, NULL, ?, ?, ?, 0, NULL, NULL, NULL, NULL, ?, NULL, ?) "
            "ON CONFLICT (request_id) DO NOTHING",
            self.dialect,
        )
        rearm = sql_for(
            f"UPDATE {TABLE_NAME} SET state = ?, reason = NULL, polls = 0, due_at = ?, "
            "expires_at = ?, queue_status = NULL, completed_at = NULL, queue_error = NULL, "
            "claim_id = NULL, finished_at = NULL, updated_at = ?, "
            "status_url = COALESCE(?, status_url), response_url = COALESCE(?, response_url) "
            "WHERE request_id = ? AND (state = ? OR state = ?)",
            self.dialect,
        )
        learn = sql_for(
            f"UPDATE {TABLE_NAME} SET status_url = COALESCE(status_url, ?), "
            "response_url = COALESCE(response_url, ?), updated_at = ? WHERE request_id = ?",
            self.dialect,
        )

        def op(tx: Tx) -> bool:
            cur = tx.cur
            cur.execute(
                insert,
                (
                    new.request_id,
                    new.endpoint_id,
                    new.status_url,
                    new.response_url,
                    new.origin,
                    ExpectationState.WAITING.value,
                    now,
                    now + ttl,
                    now + recover_after,
                    now,
                    new.trace_context,
                ),
            )
            if cur.rowcount == 1:
                return True
            cur.execute(
                rearm,
                (
                    ExpectationState.WAITING.value,
                    now,
                    now + ttl,
                    now,
                    new.status_url,
                    new.response_url,
                    new.request_id,
                    ExpectationState.FAILED.value,
                    ExpectationState.EXPIRED.value,
                ),
            )
            if cur.rowcount == 1:
                return True  # due now: a poller finds it at its next look (within 5 s)
            if new.status_url or new.response_url:
                cur.execute(learn, (new.status_url, new.response_url, now, new.request_id))
            return False

        return op

    def op_sweep(self, *, since: float | None, ttl_reason: str) -> Op:
        """Settle active expectations whose delivery is stored (arrived, or recovered when
        the delivery came from the queue), then expire those past their TTL.

        With `since`, only deliveries received since then are looked at (cheap: the
        received_at index); without, every active expectation is checked (at start).
        """
        if since is None:
            which = (
                "EXISTS (SELECT 1 FROM falhook_deliveries d "
                f"WHERE d.request_id = {TABLE_NAME}.request_id)"
            )
        else:
            which = (
                "request_id IN (SELECT d.request_id FROM falhook_deliveries d "
                "WHERE d.received_at >= ?)"
            )
        settle = sql_for(
            f"UPDATE {TABLE_NAME} SET state = {_SETTLED_STATE}, claim_id = NULL, "
            f"finished_at = ?, updated_at = ? WHERE ({ACTIVE_PREDICATE}) AND {which} "
            "RETURNING request_id, state",
            self.dialect,
        )
        expire = sql_for(
            f"UPDATE {TABLE_NAME} SET state = '{ExpectationState.EXPIRED.value}', reason = ?, "
            f"claim_id = NULL, finished_at = ?, updated_at = ? "
            f"WHERE ({ACTIVE_PREDICATE}) AND expires_at <= ? RETURNING request_id, state",
            self.dialect,
        )

        def op(tx: Tx) -> Swept:
            cur = tx.cur
            now = time.time()
            cur.execute(settle, (now, now) if since is None else (now, now, since))
            settled = {r[0]: ExpectationState(r[1]) for r in cur.fetchall()}
            cur.execute(expire, (ttl_reason, now, now, now))
            settled.update({r[0]: ExpectationState(r[1]) for r in cur.fetchall()})
            return Swept(settled)

        return op

    def op_claim(self, *, limit: int, lease_seconds: float) -> Op:
        """Claim up to `limit` due active expectations for `lease_seconds`; returns the
        claims and the earliest due_at left (None if nothing is active)."""
        due = (
            f"SELECT request_id FROM {TABLE_NAME} WHERE ({ACTIVE_PREDICATE}) AND due_at <= ? "
            "ORDER BY due_at LIMIT ?"
        )
        if self.dialect == "postgresql":
            due += " FOR UPDATE SKIP LOCKED"
        claim = sql_for(
            f"UPDATE {TABLE_NAME} SET claim_id = ?, due_at = ?, updated_at = ? "
            f"WHERE request_id IN ({due}) "
            f"RETURNING {_SELECT}, {_DELIVERED.format(t=TABLE_NAME)}",
            self.dialect,
        )
        next_due = sql_for(f"SELECT MIN(due_at) FROM {TABLE_NAME} WHERE {ACTIVE_PREDICATE}", "")

        def op(tx: Tx) -> tuple[list[ExpectationClaim], float | None]:
            cur = tx.cur
            now = time.time()
            claim_id = uuid.uuid4().hex
            cur.execute(claim, (claim_id, now + lease_seconds, now, now, limit))
            claims = [
                ExpectationClaim(Expectation.from_row(r[: len(_COLUMNS)]), claim_id, r[-1])
                for r in cur.fetchall()
            ]
            cur.execute(next_due)
            row = cur.fetchone()
            return claims, (row[0] if row else None)

        return op

    def op_update(
        self,
        claim: ExpectationClaim,
        *,
        state: ExpectationState,
        due_at: float | None = None,
        reason: str | None = None,
        polled: bool = False,
        queue_status: str | None = None,
        completed_at: float | None = None,
        queue_error: str | None = None,
    ) -> Op:
        """Write back a claimed expectation (fenced: False if the claim was lost).

        Active states reschedule it at `due_at`; final ones record `reason` and the time.
        """
        final = not state.active
        statement = sql_for(
            f"UPDATE {TABLE_NAME} SET state = ?, reason = ?, due_at = COALESCE(?, due_at), "
            "polls = polls + ?, queue_status = COALESCE(?, queue_status), "
            "completed_at = COALESCE(completed_at, ?), queue_error = COALESCE(?, queue_error), "
            "claim_id = NULL, updated_at = ?, "
            "finished_at = ? WHERE request_id = ? AND claim_id = ?",
            self.dialect,
        )

        def op(tx: Tx) -> bool:
            cur = tx.cur
            now = time.time()
            cur.execute(
                statement,
                (
                    state.value,
                    reason,
                    due_at,
                    1 if polled else 0,
                    queue_status,
                    completed_at,
                    queue_error,
                    now,
                    now if final else None,
                    claim.request_id,
                    claim.claim_id,
                ),
            )
            return bool(cur.rowcount == 1)

        return op

    def op_settle_delivered(self, claim: ExpectationClaim, *, reason: str | None = None) -> Op:
        """A delivery of the claimed request is stored: arrived, or recovered when it came
        from the queue (whichever replica stored it). Fenced like `op_update`."""
        statement = sql_for(
            f"UPDATE {TABLE_NAME} SET state = {_SETTLED_STATE}, reason = COALESCE(?, reason), "
            "claim_id = NULL, updated_at = ?, finished_at = ? "
            "WHERE request_id = ? AND claim_id = ? RETURNING state",
            self.dialect,
        )

        def op(tx: Tx) -> ExpectationState | None:
            cur = tx.cur
            now = time.time()
            cur.execute(statement, (reason, now, now, claim.request_id, claim.claim_id))
            row = cur.fetchone()
            return ExpectationState(row[0]) if row else None

        return op

    def op_mark(self, request_id: str, state: ExpectationState, reason: str | None) -> Op:
        """Set an expectation's state regardless of claims (a payload_error delivery whose
        payload was fetched: recovered). False if it is not stored."""
        statement = sql_for(
            f"UPDATE {TABLE_NAME} SET state = ?, reason = ?, claim_id = NULL, updated_at = ?, "
            "finished_at = ? WHERE request_id = ?",
            self.dialect,
        )

        def op(tx: Tx) -> bool:
            cur = tx.cur
            now = time.time()
            final = None if state.active else now
            cur.execute(statement, (state.value, reason, now, final, request_id))
            return bool(cur.rowcount == 1)

        return op

    def op_release(self, claim_ids: Sequence[str]) -> Op:
        """Give back claims not worked on (a stopping poller): due again at once."""
        statement = sql_for(
            f"UPDATE {TABLE_NAME} SET claim_id = NULL, due_at = ? WHERE claim_id = ?",
            self.dialect,
        )

        def op(tx: Tx) -> None:
            cur = tx.cur
            now = time.time()
            for claim_id in claim_ids:
                cur.execute(statement, (now, claim_id))

        return op

    def op_fill_body(self, request_id: str, claim_id: str, body: bytes) -> Op:
        """Replace a claimed delivery's body with one whose payload came from the queue (a
        ``payload_error`` delivery), so retries and replays see it too. Fenced by the
        delivery's claim; False if the claim was lost."""
        statement = sql_for(
            "UPDATE falhook_bodies SET body = ? WHERE id = (SELECT id FROM falhook_deliveries "
            "WHERE request_id = ? AND claim_id = ?)",
            self.dialect,
        )

        def op(tx: Tx) -> bool:
            cur = tx.cur
            cur.execute(statement, (body, request_id, claim_id))
            return bool(cur.rowcount == 1)

        return op

    def op_get(self, request_id: str) -> Op:
        statement = sql_for(
            f"SELECT {_SELECT} FROM {TABLE_NAME} WHERE request_id = ?", self.dialect
        )

        def op(tx: Tx) -> Expectation | None:
            cur = tx.cur
            cur.execute(statement, (request_id,))
            row = cur.fetchone()
            return Expectation.from_row(row) if row else None

        return op

    # -- async: through the store's writer ---------------------------------------------

    async def run(self, op: Op) -> Any:
        return await self.store.run(op)

    # -- sync: a connection of its own (CLI, metrics, tests) ---------------------------

    def run_sync(self, op: Op) -> Any:
        """Run one operation in a transaction on a connection of its own (checking, not
        migrating, the schema first: only `falhook serve` migrates)."""
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
        where = ""
        params: list[Any] = [s.value for s in states]
        if states:
            where = " WHERE state IN (" + ", ".join("?" for _ in states) + ")"
        text = f"SELECT {_SELECT} FROM {TABLE_NAME}{where} ORDER BY created_at DESC, request_id"
        if limit is not None:
            text += " LIMIT ?"
            params.append(limit)
        statement = sql_for(text, self.dialect)

        def op(tx: Tx) -> builtins.list[Expectation]:
            cur = tx.cur
            cur.execute(statement, tuple(params))
            return [Expectation.from_row(r) for r in cur.fetchall()]

        result: builtins.list[Expectation] = self.run_sync(op)
        return result

    def counts(self) -> dict[ExpectationState, int]:
        """Expectations in each state (every state present, zero if none)."""
        statement = f"SELECT state, COUNT(*) FROM {TABLE_NAME} GROUP BY state"

        def op(tx: Tx) -> dict[ExpectationState, int]:
            cur = tx.cur
            cur.execute(statement)
            counts = dict.fromkeys(ExpectationState, 0)
            for state, count in cur.fetchall():
                counts[ExpectationState(state)] = int(count)
            return counts

        result: dict[ExpectationState, int] = self.run_sync(op)
        return result
