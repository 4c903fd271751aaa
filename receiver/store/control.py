"""The store-wide dispatch switch: one row every replica reads.

``falhook_dispatch_control`` holds a single row (id 1, seeded by migration 5): whether
dispatch is paused, why, when and by whom it last changed. Pausing stops every replica
from starting callbacks; ingestion and acknowledgements never look at it.

A change on PostgreSQL also sends ``NOTIFY falhook_control`` in the same transaction, so
replicas listening (receiver/pause.py) see it at once; everyone also re-reads the row on a
short poll, which is all SQLite has.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import sqlalchemy as sa

from falhook.receiver.models import CONTROL

__all__ = ["CONTROL_CHANNEL", "DispatchControl", "read_control", "write_control"]

CONTROL_CHANNEL = "falhook_control"
_ROW_ID = 1  # migration 5 seeds it
_ROW = CONTROL.c.id == _ROW_ID


@dataclass(frozen=True, slots=True)
class DispatchControl:
    """The switch as last read: paused or not, and the who/when/why of its last change."""

    paused: bool = False
    reason: str | None = None
    changed_at: float | None = None  # Unix seconds; None: never changed
    changed_by: str | None = None  # "cli", "console", "api", as the writer said


def read_control(conn: sa.Connection) -> DispatchControl:
    """The current switch (not paused if the row is somehow missing)."""
    c = CONTROL.c
    row = conn.execute(
        sa.select(c.paused, c.reason, c.changed_at, c.changed_by).where(_ROW)
    ).first()
    if row is None:
        return DispatchControl()
    return DispatchControl(bool(row[0]), row[1], row[2], row[3])


def write_control(
    conn: sa.Connection, *, paused: bool, reason: str | None, by: str | None
) -> DispatchControl:
    """Set the switch inside the caller's transaction, and tell listening replicas.

    Pausing a paused store (or resuming a running one) keeps since when, by whom and why:
    a second ``pause`` without a reason must not make an hour-old pause look a second old
    and reasonless. A second pause with a new reason updates the reason and who gave it.
    """
    current = read_control(conn)
    if current.changed_at is not None and current.paused == paused:
        if not paused or reason is None or reason == current.reason:
            return current
        control = DispatchControl(True, reason, current.changed_at, by)
    else:
        control = DispatchControl(paused, reason if paused else None, time.time(), by)
    values = {
        "paused": control.paused,
        "reason": control.reason,
        "changed_at": control.changed_at,
        "changed_by": control.changed_by,
    }
    if conn.execute(sa.update(CONTROL).where(_ROW).values(values)).rowcount == 0:
        conn.execute(sa.insert(CONTROL).values(id=_ROW_ID, **values))
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f"NOTIFY {CONTROL_CHANNEL}")
    return control
