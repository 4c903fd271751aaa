"""The hot path's SQL: Core statements against the tables, compiled once per dialect.

Why raw DBAPI cursors: the statements are SQLAlchemy Core, built against the SQLModel
tables and compiled once per dialect; the writers execute the compiled text on their
driver's cursor, which skips the per-call Core overhead that would otherwise dominate the
hot path. Everything off the hot path runs Core statements on a SQLAlchemy connection.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from falhook.receiver.models import (
    ACTIVE_PREDICATE,
    ATTEMPTS,
    BODIES,
    DELIVERIES,
    EXPECTATIONS,
    State,
)
from falhook.receiver.store.engine import NOTIFY_CHANNEL
from falhook.receiver.store.migrations import VERSIONS

__all__ = ["Compiled", "Statements"]


class Compiled:
    """One compiled statement with positional placeholders, and how to fill them.

    Positional, because binding a tuple is cheaper than a dict: sqlite3 looks up each
    named parameter by a new string per execution.
    """

    __slots__ = ("_args", "constants", "sql")

    def __init__(self, sql: str, order: Sequence[str], constants: dict[str, Any]) -> None:
        self.sql = sql
        self.constants = constants  # values fixed in the statement (states, increments)
        getter = operator.itemgetter(*order) if order else (lambda _: ())
        # itemgetter of one name returns the value itself, not a 1-tuple.
        self._args: Callable[[dict[str, Any]], Any] = (
            (lambda p: (getter(p),)) if len(order) == 1 else getter
        )

    def args(self, params: dict[str, Any] | None = None) -> tuple[Any, ...]:
        """The positional parameters for `params` (by name) plus the constants."""
        args: tuple[Any, ...] = self._args(
            {**self.constants, **params} if params else self.constants
        )
        return args

    def execute(self, cursor: Any, params: dict[str, Any] | None = None) -> None:
        """Execute on a DBAPI cursor with `params` by name."""
        cursor.execute(self.sql, self.args(params))


class Statements:
    """Core statements against the delivery tables, compiled once for one dialect."""

    def __init__(self, dialect: sa.Dialect) -> None:
        self.name = dialect.name
        # Positional placeholders for both drivers: "?" for sqlite3, "%s" for psycopg.
        if self.name == "sqlite":
            compile_dialect: sa.Dialect = sqlite_dialect.dialect(paramstyle="qmark")
            insert_fn: Any = sqlite_dialect.insert
        else:
            driver: Any = type(dialect)  # the engine's own driver, positional ("%s")
            compile_dialect = driver(paramstyle="format")
            insert_fn = pg_dialect.insert
        t = DELIVERIES
        c = t.c

        def text(stmt: sa.ClauseElement) -> Compiled:
            compiled = stmt.compile(dialect=compile_dialect)
            # Constants in the statement (states, increments) became bound parameters with
            # values; keep those values so each execution only supplies its own.
            constants = {
                name: bind.value
                for bind, name in compiled.bind_names.items()  # type: ignore[attr-defined]
                if not bind.required
            }
            order = compiled.positiontup or []  # type: ignore[attr-defined]
            return Compiled(str(compiled), order, constants)

        bp = sa.bindparam
        # Literal SQL rather than IN (…) with parameters: an "expanding" IN cannot be compiled
        # ahead of time, and the partial index on due_at needs the literal predicate.
        active = sa.text(f"({ACTIVE_PREDICATE})")
        row: dict[str, Any] = {
            name: bp(name)
            for name in (
                "request_id",
                "gateway_request_id",
                "status",
                "error",
                "payload_error",
                "user_id",
                "received_at",
                "source",
                "signed_at",
                "trace_context",
            )
        }
        row["updated_at"] = bp("received_at")
        b = BODIES
        # Spelled out: SQLite's compiler writes RETURNING columns unqualified, which would
        # turn a Core correlation into "id = id" (true for every body).
        body_of = (
            sa.select(b.c.body)
            .where(sa.text("falhook_bodies.id = falhook_deliveries.id"))
            .scalar_subquery()
        )

        def with_body(insert: Any) -> Compiled:
            # A new delivery's state row, then its body under the same id. PostgreSQL does
            # both in one statement (one round trip): the body is inserted only for a row
            # the first insert returned, so a duplicate inserts nothing. SQLite has no DML
            # in a WITH; there the op follows with `insert_body` and the cursor's lastrowid.
            insert = insert.on_conflict_do_nothing(index_elements=["request_id"])
            if self.name != "postgresql":
                return text(insert)
            added = insert.returning(c.id).cte("added")
            body = sa.bindparam("body", type_=sa.LargeBinary)
            return text(sa.insert(b).from_select(["id", "body"], sa.select(added.c.id, body)))

        self.insert = with_body(
            insert_fn(t).values(
                **row, state=State.PENDING.value, attempts=0, rearm=0, due_at=bp("received_at")
            )
        )
        # The same, already claimed by the inserting process: it dispatches at once after
        # the commit, without a separate claim. A crash before that leaves a lease to expire.
        self.insert_claimed = with_body(
            insert_fn(t).values(
                **row,
                state=State.RUNNING.value,
                attempts=1,
                rearm=0,
                claim_id=bp("claim_id"),
                due_at=bp("lease_until"),
            )
        )
        self.insert_body = (
            None
            if self.name == "postgresql"
            else text(sa.insert(b).values(id=bp("id"), body=bp("body")))
        )
        # A duplicate: one of a dead delivery re-arms it (a duplicate must never hide a
        # failure); one of a delivery in flight marks it, so that it is re-armed if it then
        # dies (revive_flagged). One statement, on purpose: as two, a replica's bury could
        # commit between them (READ COMMITTED), and the duplicate would do neither.
        # PostgreSQL waits for that bury, then evaluates the CASEs on the row it wrote.
        dead = c.state == State.DEAD.value

        def if_dead(value: Any, otherwise: Any) -> Any:
            return sa.case((dead, value), else_=otherwise)

        self.on_duplicate = text(
            sa.update(t)
            .where(c.request_id == bp("request_id"), c.state != State.DONE.value)
            .values(
                state=if_dead(State.PENDING.value, c.state),
                attempts=if_dead(0, c.attempts),
                due_at=if_dead(bp("now"), c.due_at),
                updated_at=if_dead(bp("now"), c.updated_at),
                finished_at=if_dead(None, c.finished_at),
                claim_id=if_dead(None, c.claim_id),
                rearm=if_dead(0, 1),
            )
            .returning(c.rearm)  # 0: it was dead, and is re-armed; 1: marked
        )
        self.revive_flagged = text(
            sa.update(t)
            .where(c.request_id == bp("request_id"), c.state == State.DEAD.value, c.rearm == 1)
            .values(
                state=State.PENDING.value,
                attempts=0,
                rearm=0,
                due_at=bp("now"),
                updated_at=bp("now"),
                finished_at=None,
            )
        )
        due = (
            sa.select(c.id)
            .where(active, c.due_at <= bp("now"))
            .order_by(c.due_at)
            .limit(bp("limit"))
        )
        if self.name == "postgresql":
            due = due.with_for_update(skip_locked=True)
        self.claim = text(
            sa.update(t)
            .where(c.id.in_(due.scalar_subquery()))
            .values(
                state=State.RUNNING.value,
                claim_id=bp("claim_id"),
                due_at=bp("lease_until"),
                attempts=c.attempts + 1,
                updated_at=bp("now"),
            )
            .returning(
                c.request_id,
                c.attempts,
                c.status,
                body_of,
                c.user_id,
                c.received_at,
                c.completed_callbacks,
                c.source,
                c.signed_at,
                c.trace_context,
            )
        )
        # Tracing only: the context an expected request was submitted in, stored with the
        # delivery so that its processing links to the submit (operations._traced).
        e = EXPECTATIONS.c
        self.submitted_in = text(sa.select(e.trace_context).where(e.request_id == bp("request_id")))
        self.next_due = text(sa.select(sa.func.min(c.due_at)).where(active))
        mine = (
            c.request_id == bp("request_id"),
            c.claim_id == bp("claim"),
            c.state == State.RUNNING.value,
        )
        self.renew = text(
            sa.update(t).where(*mine).values(due_at=bp("lease_until"), updated_at=bp("now"))
        )
        # What every outcome writes: the claim is released, progress and time recorded.
        released: dict[str, Any] = {
            "claim_id": None,
            "completed_callbacks": bp("completed_callbacks"),
            "updated_at": bp("now"),
        }
        self.finish = text(
            sa.update(t)
            .where(*mine)
            .values(
                state=State.DONE.value,
                last_error=None,
                finished_at=bp("now"),
                rearm=0,
                **released,
            )
        )
        self.reschedule = text(
            sa.update(t)
            .where(*mine)
            .values(
                state=State.PENDING.value,
                due_at=bp("due_at"),
                last_error=bp("last_error"),
                **released,
            )
        )
        self.bury = text(
            sa.update(t)
            .where(*mine)
            .values(
                state=State.DEAD.value,
                last_error=bp("last_error"),
                finished_at=bp("now"),
                **released,
            )
        )
        # The attempt an outcome ends (attempts.op_settle), keyed by the delivery's id.
        a = ATTEMPTS
        self.attempt = text(
            sa.insert(a).from_select(
                [
                    "delivery_id",
                    "attempt",
                    "started_at",
                    "duration_seconds",
                    "outcome",
                    "error",
                    "next_attempt_at",
                ],
                sa.select(
                    c.id,
                    bp("attempt", type_=sa.Integer),
                    bp("started_at", type_=sa.Float),
                    bp("duration_seconds", type_=sa.Float),
                    bp("outcome", type_=sa.String),
                    bp("error", type_=sa.String),
                    bp("next_attempt_at", type_=sa.Float),
                ).where(c.request_id == bp("request_id")),
            )
        )
        # Rewrites one existing row unchanged (the version table always has its rows once
        # the schema is there): as much of a write as the storage sees, with no effect.
        v = VERSIONS.c
        self.ping = text(
            sa.update(VERSIONS)
            .where(v.version == sa.select(sa.func.max(v.version)).scalar_subquery())
            .values(description=v.description)
        )
        self.notify = f"NOTIFY {NOTIFY_CHANNEL}" if self.name == "postgresql" else None

    def add(self, cur: Any, insert: Compiled, params: dict[str, Any]) -> bool:
        """Insert a new delivery and its body; False (nothing written) for a duplicate."""
        insert.execute(cur, params)
        if cur.rowcount != 1:
            return False
        if self.insert_body is not None:
            self.insert_body.execute(cur, {"id": cur.lastrowid, "body": params["body"]})
        return True
