"""The states of a stored delivery, and where it came from (apart from models.py, so the
CLI's --help can name them without importing SQLModel)."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["SOURCE_QUEUE", "SOURCE_WEBHOOK", "State"]

SOURCE_WEBHOOK = "webhook"  # fal posted the delivery to /webhooks/fal
SOURCE_QUEUE = "queue"  # falhook fetched the result from fal's queue (no webhook came)


class State(StrEnum):
    """Life of a stored delivery. The values are what the database holds."""

    PENDING = "pending"  # waiting for (re)dispatch at due_at
    RUNNING = "running"  # claimed; due_at is the lease expiry, after which it may be retaken
    DONE = "done"  # every callback succeeded
    DEAD = "dead"  # out of attempts; last_error says why; replayable
