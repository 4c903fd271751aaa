"""Operations: functions run on the writer's cursor, inside its batch transaction.

Each returns its request's result (delivered only once the transaction committed); one
that makes work due sets ``tx.due_now`` so the dispatchers are woken after the commit.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Iterable
from typing import Any

from falhook.receiver.store.attempts import rearm_if_redelivered
from falhook.receiver.store.records import Claim, ClaimBatch, NewDelivery, decode_callbacks
from falhook.receiver.store.statements import Compiled
from falhook.receiver.store.writer import Op, Tx

__all__ = [
    "decode_callbacks",
    "encode_callbacks",
    "op_claim",
    "op_fenced",
    "op_insert",
    "op_insert_claimed",
    "op_ping",
]


def _row(new: NewDelivery) -> dict[str, Any]:
    return {
        "request_id": new.request_id,
        "gateway_request_id": new.gateway_request_id,
        "status": new.status,
        "error": new.error,
        "payload_error": new.payload_error,
        "user_id": new.user_id,
        "body": new.body,
        "received_at": new.received_at,
        "source": new.source,
        "signed_at": new.signed_at,
        "trace_context": new.trace_context,
    }


def _traced(tx: Tx, params: dict[str, Any]) -> None:
    """With tracing (a delivery received in a traced request): its submit's context after
    its own, when its request was submitted through falhook, for its processing to link."""
    tx.sql.submitted_in.execute(tx.cur, params)
    row = tx.cur.fetchone()
    if row is not None and row[0]:
        params["trace_context"] = f"{params['trace_context']} {row[0]}"


def _duplicate(tx: Tx, request_id: str) -> None:
    # A duplicate of a dead delivery re-arms it: a duplicate must never hide a failure.
    # One of a delivery still in flight is noted: if it then gives up, it is re-armed
    # (attempts.op_settle), so whether fal's redelivery counts never depends on timing.
    tx.sql.on_duplicate.execute(tx.cur, {"request_id": request_id, "now": time.time()})
    row = tx.cur.fetchone()
    if row is not None and row[0] == 0:
        tx.due_now = True  # it was dead: re-armed, due now


def op_insert(new: NewDelivery) -> Op:
    """Store a new delivery, pending; True if new, False for a duplicate."""
    params = _row(new)

    def op(tx: Tx) -> bool:
        if params["trace_context"] is not None:
            _traced(tx, params)
        if tx.sql.add(tx.cur, tx.sql.insert, params):
            tx.due_now = True
            return True
        _duplicate(tx, new.request_id)
        return False

    return op


def op_insert_claimed(
    new: NewDelivery, claim_id: str, lease_seconds: float, parsed: dict[str, Any] | None
) -> Op:
    """Store a new delivery already claimed by `claim_id` (running, attempt 1); its
    `Claim`, or None for a duplicate."""
    params = _row(new)
    params["claim_id"] = claim_id

    def op(tx: Tx) -> Claim | None:
        # From now, in the writer's transaction, not from the delivery's arrival: a body
        # read slowly or a commit queued behind others must not leave a lease that has
        # already run out when the row becomes visible (another replica would retake it).
        params["lease_until"] = time.time() + lease_seconds
        if params["trace_context"] is not None:
            _traced(tx, params)
        if tx.sql.add(tx.cur, tx.sql.insert_claimed, params):
            return Claim(
                request_id=new.request_id,
                claim_id=claim_id,
                attempt=1,
                status=new.status,
                body=new.body,
                user_id=new.user_id,
                received_at=new.received_at,
                completed_callbacks=(),
                parsed=parsed,
                source=new.source,
                signed_at=new.signed_at,
                trace_context=params["trace_context"],
            )
        _duplicate(tx, new.request_id)
        return None

    return op


@functools.lru_cache(maxsize=256)
def _encode_sorted(names: tuple[str, ...]) -> str:
    # The same few callback sets recur for every delivery: encode each once.
    return json.dumps(list(names))


def encode_callbacks(names: Iterable[str]) -> str | None:
    unique = tuple(sorted(set(names)))
    return _encode_sorted(unique) if unique else None


def op_claim(claim_id: str, limit: int, lease_seconds: float) -> Op:
    """Claim up to `limit` due deliveries (pending, or running with an expired lease)."""

    def op(tx: Tx) -> ClaimBatch:
        cur, sql = tx.cur, tx.sql
        now = time.time()
        sql.claim.execute(
            cur,
            {"now": now, "limit": limit, "claim_id": claim_id, "lease_until": now + lease_seconds},
        )
        claims = [
            Claim(
                request_id=r[0],
                claim_id=claim_id,
                attempt=r[1],
                status=r[2],
                # No body row would be a damaged store: an empty body then fails as
                # "stored body unreadable" and is retried, not a crashed claim batch.
                body=bytes(r[3]) if r[3] is not None else b"",
                user_id=r[4],
                received_at=r[5],
                completed_callbacks=decode_callbacks(r[6]),
                source=r[7],
                signed_at=r[8],
                trace_context=r[9],
            )
            for r in cur.fetchall()
        ]
        sql.next_due.execute(cur)
        row = cur.fetchone()
        return ClaimBatch(claims, row[0] if row else None)

    return op


def op_fenced(statement: str, params: dict[str, Any]) -> Op:
    """A write to a claimed delivery (renew, finish, reschedule, bury) that changes
    nothing unless the claim is still ours; True if it was."""

    def op(tx: Tx) -> bool:
        compiled: Compiled = getattr(tx.sql, statement)
        now = time.time()
        compiled.execute(tx.cur, {**params, "now": now})
        if tx.cur.rowcount != 1:
            return False
        if statement == "bury":
            rearm_if_redelivered(tx, params["request_id"], now)
        return True

    return op


def op_ping(tx: Tx) -> None:
    """A round trip through the writer's connection, with a write: ready means a write
    can commit (a full disk fails it, where a SELECT would pass)."""
    tx.sql.ping.execute(tx.cur)
