"""Did dispatch keep up? What a falhook target's store holds when the load stops.

A receiver can look fast by acknowledging deliveries and leaving their callbacks for later:
the work is only deferred. So for every falhook target the harness reads the store right
after wrk stops (how many deliveries are done, and how many still wait or run), then waits
for the rest to be dispatched and reports how long that took. A run that does not drain
within the deadline is invalid.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

TABLE = "falhook_deliveries"
DRAIN_DEADLINE_S = 60.0
_UNFINISHED = ("pending", "running")


def state_counts(database_url: str) -> dict[str, int]:
    """Deliveries per state, read with a connection of its own.

    Plain SQL on the one column every schema version has, not ``Store.counts()``: a
    ``Store`` migrates the database it opens, and ``bench.ab`` reads the stores of older
    checkouts while their servers are still dispatching.
    """
    engine = sa.create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT state, count(*) FROM {TABLE} GROUP BY state"))
            return {str(state): int(n) for state, n in rows}
    finally:
        engine.dispose()


def unfinished(counts: dict[str, int]) -> int:
    return sum(counts.get(s, 0) for s in _UNFINISHED)


def measure(database_url: str, deadline_s: float = DRAIN_DEADLINE_S) -> dict[str, Any]:
    """Counts when the load stopped, then poll (every 0.1 s, up to the deadline) until
    nothing is pending or running."""
    at_end = state_counts(database_url)
    started = time.monotonic()
    left = unfinished(at_end)
    while left and time.monotonic() - started < deadline_s:
        time.sleep(0.1)
        left = unfinished(state_counts(database_url))
    total = sum(at_end.values())
    return {
        "at_end": at_end,
        "done_at_end": at_end.get("done", 0) / total if total else None,
        "drained": left == 0,
        "drained_after_s": round(time.monotonic() - started, 2) if left == 0 else None,
        "unfinished_after_deadline": left,
    }


def problems(backlog: dict[str, Any]) -> list[str]:
    if backlog.get("drained", True):
        return []
    return [
        f"dispatch did not catch up: {backlog['unfinished_after_deadline']} deliveries "
        f"still unfinished {DRAIN_DEADLINE_S:g} s after the load stopped"
    ]


def summary(backlog: dict[str, Any]) -> str:
    done = backlog.get("done_at_end")
    text = f"dispatched by the end of the load: {done:.0%}" if done is not None else "no rows"
    if backlog.get("drained"):
        return f"{text}; all done {backlog['drained_after_s']:g} s later"
    return f"{text}; {backlog['unfinished_after_deadline']} still unfinished"
