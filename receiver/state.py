"""The states of a stored delivery, and where it came from (apart from models.py, so the
CLI's --help can name them without importing SQLModel)."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["RETRYING", "SHOWN_STATES", "SOURCE_QUEUE", "SOURCE_WEBHOOK", "State", "shown_state"]

SOURCE_WEBHOOK = "webhook"  # fal posted the delivery to /webhooks/fal
SOURCE_QUEUE = "queue"  # falhook fetched the result from fal's queue (no webhook came)


class State(StrEnum):
    """Life of a stored delivery. The values are what the database holds."""

    PENDING = "pending"  # waiting for (re)dispatch at due_at
    RUNNING = "running"  # claimed; due_at is the lease expiry, after which it may be retaken
    DONE = "done"  # every callback succeeded
    DEAD = "dead"  # out of attempts; last_error says why; replayable


# Not a stored state: a pending delivery that failed before (or whose callback asked for
# Retry(after=…)) and is due later is *shown* as retrying, with its next attempt's time.
RETRYING = "retrying"
SHOWN_STATES = (
    State.PENDING.value,
    RETRYING,
    State.RUNNING.value,
    State.DONE.value,
    State.DEAD.value,
)


def shown_state(state: str, attempts: int, due_at: float, now: float) -> str:
    """The state an operator is shown: `RETRYING` for a failed delivery waiting for a later
    attempt, else the stored state."""
    if state == State.PENDING.value and attempts > 0 and due_at > now:
        return RETRYING
    return state
