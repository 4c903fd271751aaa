"""Attempts: every dispatch attempt of a delivery, kept for operators (`deliveries show`).

A delivery's own row holds only its latest error; this table keeps each attempt — when it
started, how long its callbacks ran, what came of it (done, retry, dead), the error with
its traceback (truncated), and for a retry when the next attempt is due.

An attempt is written by the same operation, in the same transaction, as the outcome it
records (`op_settle`): no extra transaction on the dispatch path, and no attempt row for
an outcome that was not written (a claim lost to another process writes neither).
Rows are keyed by the delivery's sequential ``id`` and deleted with it by ``prune``.

Plain SQL with positional parameters (one spelling for both drivers), like
expectations.py: each statement reads best written out.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from falhook.receiver.store.statements import Compiled
from falhook.receiver.store.writer import Op, Tx

__all__ = [
    "ATTEMPTS",
    "AttemptRecord",
    "StoredAttempt",
    "delete_for",
    "list_attempts",
    "op_settle",
]

TABLE_NAME = "falhook_attempts"
# The table as migration 6 creates it (tests check that the two agree).
ATTEMPTS = sa.Table(
    TABLE_NAME,
    sa.MetaData(),
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    sa.Column("delivery_id", sa.BigInteger, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("duration_seconds", sa.Float, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("error", sa.String, nullable=True),
    sa.Column("next_attempt_at", sa.Float, nullable=True),
    sa.Index("ix_falhook_attempts_delivery_id", "delivery_id", "id"),
)

# The outcome each fenced statement records.
_OUTCOMES = {"finish": "done", "reschedule": "retry", "bury": "dead"}
_INSERT = (
    f"INSERT INTO {TABLE_NAME} "
    "(delivery_id, attempt, started_at, duration_seconds, outcome, error, next_attempt_at) "
    "SELECT id, ?, ?, ?, ?, ?, ? FROM falhook_deliveries WHERE request_id = ?"
)


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One attempt as the dispatcher saw it, to be stored with its outcome."""

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


def _sql(text: str, dialect: str) -> str:
    # sqlite3 takes "?", psycopg "%s" (no statement here holds a literal "?" or "%").
    return text if dialect == "sqlite" else text.replace("?", "%s")


def op_settle(statement: str, params: dict[str, Any], record: AttemptRecord, *, dialect: str) -> Op:
    """Write an outcome (``finish``, ``reschedule`` or ``bury``: fenced by the claim) and,
    when it was written, the attempt it ends; True if the claim was still ours."""
    insert = _sql(_INSERT, dialect)
    outcome = _OUTCOMES[statement]
    next_at = params.get("due_at") if statement == "reschedule" else None

    def op(tx: Tx) -> bool:
        compiled: Compiled = getattr(tx.sql, statement)
        compiled.execute(tx.cur, {**params, "now": time.time()})
        if tx.cur.rowcount != 1:
            return False  # the claim was lost: its new holder records what it does
        tx.cur.execute(
            insert,
            (
                record.attempt,
                record.started_at,
                record.duration,
                outcome,
                record.error,
                next_at,
                params["request_id"],
            ),
        )
        return True

    return op


def list_attempts(conn: sa.Connection, request_id: str) -> list[StoredAttempt]:
    """A delivery's attempts, oldest first (a replay starts counting again from 1)."""
    a = ATTEMPTS.c
    deliveries = sa.table("falhook_deliveries", sa.column("id"), sa.column("request_id"))
    stmt = (
        sa.select(
            a.attempt, a.started_at, a.duration_seconds, a.outcome, a.error, a.next_attempt_at
        )
        .join(deliveries, deliveries.c.id == a.delivery_id)
        .where(deliveries.c.request_id == request_id)
        .order_by(a.id)
    )
    return [StoredAttempt(*row) for row in conn.execute(stmt)]


def delete_for(conn: sa.Connection, delivery_ids: Sequence[int]) -> None:
    """Delete the attempts of these deliveries (prune, in its transaction)."""
    conn.execute(sa.delete(ATTEMPTS).where(ATTEMPTS.c.delivery_id.in_(list(delivery_ids))))
