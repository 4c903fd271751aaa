"""The store-wide dispatch switch: one row every replica reads (SQL only).

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

from falhook.receiver.store.dbapi import Db

__all__ = ["CONTROL_CHANNEL", "DispatchControl", "read_control", "write_control"]

CONTROL_CHANNEL = "falhook_control"
TABLE_NAME = "falhook_dispatch_control"  # migration 5 creates it and seeds the row
_ROW_ID = 1


@dataclass(frozen=True, slots=True)
class DispatchControl:
    """The switch as last read: paused or not, and the who/when/why of its last change."""

    paused: bool = False
    reason: str | None = None
    changed_at: float | None = None  # Unix seconds; None: never changed
    changed_by: str | None = None  # "cli", "console", "api", as the writer said


def read_control(db: Db) -> DispatchControl:
    """The current switch (not paused if the row is somehow missing)."""
    row = db.execute(
        f"SELECT paused, reason, changed_at, changed_by FROM {TABLE_NAME} WHERE id = ?",
        [_ROW_ID],
    ).fetchone()
    if row is None:
        return DispatchControl()
    return DispatchControl(bool(row[0]), row[1], row[2], row[3])


def write_control(db: Db, *, paused: bool, reason: str | None, by: str | None) -> DispatchControl:
    """Set the switch inside the caller's transaction, and tell listening replicas.

    Pausing a paused store (or resuming a running one) keeps since when, by whom and why:
    a second ``pause`` without a reason must not make an hour-old pause look a second old
    and reasonless. A second pause with a new reason updates the reason and who gave it.
    """
    current = read_control(db)
    if current.changed_at is not None and current.paused == paused:
        if not paused or reason is None or reason == current.reason:
            return current
        control = DispatchControl(True, reason, current.changed_at, by)
    else:
        control = DispatchControl(paused, reason if paused else None, time.time(), by)
    values = [control.paused, control.reason, control.changed_at, control.changed_by]
    updated = db.execute(
        f"UPDATE {TABLE_NAME} SET paused = ?, reason = ?, changed_at = ?, changed_by = ? "
        "WHERE id = ?",
        [*values, _ROW_ID],
    )
    if updated.rowcount == 0:
        db.execute(
            f"INSERT INTO {TABLE_NAME} (paused, reason, changed_at, changed_by, id) "
            "VALUES (?, ?, ?, ?, ?)",
            [*values, _ROW_ID],
        )
    if db.dialect == "postgresql":
        db.execute(f"NOTIFY {CONTROL_CHANNEL}")
    return control
