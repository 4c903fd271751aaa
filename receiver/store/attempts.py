"""Attempts: every dispatch attempt of a delivery, kept for operators (`deliveries show`).

A delivery's own row holds only its latest error; this table keeps each attempt — when it
started, how long its callbacks ran, what came of it (done, retry, dead), the error with
its traceback (truncated), and for a retry when the next attempt is due.

An attempt is written by the same operation, in the same transaction, as the outcome it
records (`op_settle`): no extra transaction on the dispatch path, and no attempt row for
an outcome that was not written (a claim lost to another process writes neither).
Rows are keyed by the delivery's sequential ``id`` and deleted with it by ``prune``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import sqlalchemy as sa

from falhook.receiver.models import ATTEMPTS, DELIVERIES
from falhook.receiver.store.writer import Op, Tx

__all__ = [
    "AttemptRecord",
    "StoredAttempt",
    "delete_for",
    "list_attempts",
    "op_settle",
]

# The outcome each fenced statement records.
_OUTCOMES = {"finish": "done", "reschedule": "retry", "bury": "dead"}


class AttemptRecord(NamedTuple):
    """One attempt as the dispatcher saw it, to be stored with its outcome (a tuple:
    made for every delivery, and a frozen dataclass costs several times as much)."""

    attempt: int
    started_at: float  # Unix seconds
    duration: float  # seconds the callbacks ran
    error: str | None  # the first failure with its traceback (truncated), or None


@dataclass(frozen=True, slots=True)
class StoredAttempt:
    """One attempt as `deliveries show` lists it."""

    attempt: int
    started_at: float
    duration_seconds: float
    outcome: str  # done, retry or dead
    error: str | None
    next_attempt_at: float | None  # a retry's due time


def rearm_if_redelivered(tx: Tx, request_id: str, now: float) -> None:
    """Just buried: if fal sent it again while it was in flight (the ``rearm`` mark), it
    gets another set of attempts, as a duplicate after it died would give it."""
    tx.sql.revive_flagged.execute(tx.cur, {"request_id": request_id, "now": now})
    if tx.cur.rowcount == 1:
        tx.due_now = True


def op_settle(statement: str, params: dict[str, Any], record: AttemptRecord) -> Op:
    """Write an outcome (``finish``, ``reschedule`` or ``bury``: fenced by the claim) and,
    when it was written, the attempt it ends; True if the claim was still ours."""
    attempt = {
        "request_id": params["request_id"],
        "attempt": record.attempt,
        "started_at": record.started_at,
        "duration_seconds": record.duration,
        "outcome": _OUTCOMES[statement],
        "error": record.error,
        "next_attempt_at": params.get("due_at") if statement == "reschedule" else None,
    }

    def op(tx: Tx) -> bool:
        compiled = getattr(tx.sql, statement)  # a statements.Compiled
        now = time.time()
        compiled.execute(tx.cur, {**params, "now": now})
        if tx.cur.rowcount != 1:
            return False  # the claim was lost: its new holder records what it does
        tx.sql.attempt.execute(tx.cur, attempt)
        if statement == "bury":
            rearm_if_redelivered(tx, params["request_id"], now)
        return True

    return op


_LIST = (
    sa.select(
        ATTEMPTS.c.attempt,
        ATTEMPTS.c.started_at,
        ATTEMPTS.c.duration_seconds,
        ATTEMPTS.c.outcome,
        ATTEMPTS.c.error,
        ATTEMPTS.c.next_attempt_at,
    )
    .join(DELIVERIES, DELIVERIES.c.id == ATTEMPTS.c.delivery_id)
    .where(DELIVERIES.c.request_id == sa.bindparam("request_id"))
    .order_by(ATTEMPTS.c.id)
)


def list_attempts(conn: sa.Connection, request_id: str) -> list[StoredAttempt]:
    """A delivery's attempts, oldest first (a replay starts counting again from 1)."""
    return [StoredAttempt(*row) for row in conn.execute(_LIST, {"request_id": request_id})]


def delete_for(conn: sa.Connection, delivery_ids: Sequence[int]) -> None:
    """Delete the attempts of these deliveries (prune, in its transaction)."""
    conn.execute(sa.delete(ATTEMPTS).where(ATTEMPTS.c.delivery_id.in_(delivery_ids)))
