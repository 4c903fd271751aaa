"""What the console reads: a filtered page of deliveries, newest first, by keyset.

Keyset, not OFFSET: a page is ``received_at, id`` strictly older than the last row of the
page before, so page 1,000 costs what page 1 does. Each state filter is read through an
index that serves the order (checked with EXPLAIN in the tests):

- no state, or done: the received_at index, walked backwards (on SQLite the index holds the
  rowid, which is `id`, so ``received_at DESC, id DESC`` needs no sort);
- dead: the partial index of dead rows by received_at (migration 4) — a million done rows
  are never walked to find the few dead ones;
- pending or running: the partial index of active rows, then a sort of the backlog only.

Status, the time range and the request_id prefix narrow that walk. A prefix alone on a huge
store walks received_at until it has a page: give a time range with it to bound that. The
prefix is exact on both backends: case-sensitive, and ``%`` or ``_`` are themselves (a
comparison of the id's first characters, not LIKE, which ignores ASCII case on SQLite).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from falhook.receiver.durations import parse_since
from falhook.receiver.models import ACTIVE_PREDICATE, DELIVERIES, State
from falhook.receiver.state import RETRYING, shown_state
from falhook.receiver.store.admin import retrying_condition

__all__ = ["PAGE_SIZE", "STATUSES", "Cursor", "Filters", "Row", "page", "parse_filters"]

PAGE_SIZE = 50
STATUSES = ("OK", "ERROR")
_MAX_PREFIX = 255
TABLE = DELIVERIES

_COLUMNS = (
    TABLE.c.id,
    TABLE.c.request_id,
    TABLE.c.state,
    TABLE.c.status,
    TABLE.c.attempts,
    TABLE.c.received_at,
    TABLE.c.last_error,
    TABLE.c.due_at,
)


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the next page starts: strictly older than this row."""

    received_at: float
    id: int

    def encode(self) -> str:
        return f"{self.received_at!r}_{self.id}"

    @classmethod
    def decode(cls, text: str) -> Cursor | None:
        received, _, row_id = text.partition("_")
        try:
            cursor = cls(float(received), int(row_id))
        except ValueError:
            return None
        if not -(2**63) <= cursor.id < 2**63:  # a row id; the drivers raise OverflowError
            return None
        return cursor if cursor.received_at == cursor.received_at else None  # not NaN


@dataclass(frozen=True, slots=True)
class Filters:
    state: State | None = None
    status: str | None = None
    since: float | None = None
    until: float | None = None
    prefix: str | None = None
    # "retrying": pending deliveries that failed before and are due after this time.
    retrying_after: float | None = None


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the list (no body)."""

    id: int
    request_id: str
    state: str
    status: str
    attempts: int
    received_at: float
    last_error: str | None
    due_at: float

    def shown_state(self, now: float) -> str:
        """`RETRYING` when waiting for a later attempt, else the stored state."""
        return shown_state(self.state, self.attempts, self.due_at, now)


def parse_filters(params: Mapping[str, str]) -> tuple[Filters, list[str]]:
    """Filters from query or form fields, and a message for each one that is unusable."""
    problems: list[str] = []
    state = None
    retrying_after = None
    if (raw := params.get("state", "").strip()) == RETRYING:
        state, retrying_after = State.PENDING, time.time()
    elif raw:
        try:
            state = State(raw)
        except ValueError:
            problems.append(f"unknown state {raw!r}")
    status = params.get("status", "").strip().upper() or None
    if status is not None and status not in STATUSES:
        problems.append(f"unknown status {status!r}")
        status = None
    times: dict[str, float | None] = {}
    for name in ("since", "until"):
        times[name] = None
        if raw := params.get(name, "").strip():
            try:
                times[name] = parse_since(raw)
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
    prefix = params.get("q", "").strip()[:_MAX_PREFIX] or None
    if prefix is not None and any(ch < " " or ch == "\x7f" for ch in prefix):
        # A NUL cannot even be sent to PostgreSQL; no request id holds control characters.
        problems.append("request id prefix: control characters are not part of a request id")
        prefix = None
    filters = Filters(state, status, times["since"], times["until"], prefix, retrying_after)
    return filters, problems


# The index each state filter is read through (see the module docstring). PostgreSQL
# chooses by its statistics; SQLite, which has none unless ANALYZE ran, would take the
# (state, due_at) index for an equality on state and then sort every matching row, so
# there the index is named (INDEXED BY).
_INDEX_FOR: dict[State | None, str] = {
    None: "ix_falhook_deliveries_received_at",
    State.DONE: "ix_falhook_deliveries_received_at",
    State.DEAD: "ix_falhook_deliveries_dead_received",
    State.PENDING: "ix_falhook_deliveries_active_due",
    State.RUNNING: "ix_falhook_deliveries_active_due",
}


def _where(stmt: sa.Select[Any], filters: Filters) -> sa.Select[Any]:
    state = filters.state
    if state is State.DEAD:
        # Literal, as the partial index states it: a bound parameter would not match it.
        stmt = stmt.where(sa.text("state = 'dead'"))
    elif state in (State.PENDING, State.RUNNING):
        stmt = stmt.where(sa.text(f"({ACTIVE_PREDICATE})"), TABLE.c.state == state.value)
    elif state is State.DONE:
        stmt = stmt.where(TABLE.c.state == state.value)
    if filters.retrying_after is not None:
        stmt = stmt.where(retrying_condition(filters.retrying_after))
    if filters.status is not None:
        stmt = stmt.where(TABLE.c.status == filters.status)
    if filters.since is not None:
        stmt = stmt.where(TABLE.c.received_at >= filters.since)
    if filters.until is not None:
        stmt = stmt.where(TABLE.c.received_at < filters.until)
    if filters.prefix is not None:
        prefix = filters.prefix
        stmt = stmt.where(sa.func.substr(TABLE.c.request_id, 1, len(prefix)) == prefix)
    return stmt


def page_statement(
    filters: Filters, cursor: Cursor | None, size: int = PAGE_SIZE
) -> sa.Select[Any]:
    """The SELECT for one page (one row more than `size`, to know whether more follow)."""
    stmt = _where(sa.select(*_COLUMNS), filters)
    if cursor is not None:
        # The first term is a plain range on the index; the second breaks ties by id.
        stmt = stmt.where(
            TABLE.c.received_at <= cursor.received_at,
            sa.or_(TABLE.c.received_at < cursor.received_at, TABLE.c.id < cursor.id),
        )
    return stmt.order_by(TABLE.c.received_at.desc(), TABLE.c.id.desc()).limit(size + 1)


def sql_for(conn: sa.Connection, stmt: sa.Select[Any], state: State | None) -> tuple[str, Any]:
    """The statement's SQL and parameters for this connection, the index named on SQLite."""
    compiled = stmt.compile(dialect=conn.dialect)
    sql = str(compiled)
    if conn.dialect.name == "sqlite":
        sql = sql.replace(
            f"FROM {TABLE.name}", f"FROM {TABLE.name} INDEXED BY {_INDEX_FOR[state]}", 1
        )
        params: Any = tuple(compiled.params[name] for name in compiled.positiontup or ())
    else:
        params = compiled.params
    return sql, params


def _rows(conn: sa.Connection, stmt: sa.Select[Any], state: State | None) -> list[Any]:
    sql, params = sql_for(conn, stmt, state)
    return list(conn.exec_driver_sql(sql, params))


def page(
    conn: sa.Connection, filters: Filters, cursor: Cursor | None, size: int = PAGE_SIZE
) -> tuple[list[Row], Cursor | None]:
    """One page of deliveries, newest first, and the cursor of the next (None at the end)."""
    stmt = page_statement(filters, cursor, size)
    rows = [Row(*r) for r in _rows(conn, stmt, filters.state)]
    if len(rows) <= size:
        return rows, None
    rows = rows[:size]
    return rows, Cursor(rows[-1].received_at, rows[-1].id)


def dead_matching(conn: sa.Connection, filters: Filters, limit: int) -> tuple[list[str], int]:
    """Request ids of the dead deliveries matching `filters` (up to `limit`), and how many."""
    dead = Filters(State.DEAD, filters.status, filters.since, filters.until, filters.prefix)
    ids = _where(sa.select(TABLE.c.request_id), dead)
    ids = ids.order_by(TABLE.c.received_at.desc()).limit(limit)
    count = _where(sa.select(sa.func.count()).select_from(TABLE), dead)
    found = [r[0] for r in _rows(conn, ids, State.DEAD)]
    return found, int(_rows(conn, count, State.DEAD)[0][0])
