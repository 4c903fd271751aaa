"""The states of a stored delivery (apart from models.py, so the CLI can name them without
importing SQLModel)."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["State"]


class State(StrEnum):
    """Life of a stored delivery. The values are what the database holds."""

    PENDING = "pending"  # waiting for (re)dispatch at due_at
    RUNNING = "running"  # claimed; due_at is the lease expiry, after which it may be retaken
    DONE = "done"  # every callback succeeded
    DEAD = "dead"  # out of attempts; last_error says why; replayable
