"""The values that travel between the app, the store, the dispatcher and the operator.

Plain frozen dataclasses: values handed between threads and tasks, not table rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from falhook.receiver.state import SOURCE_WEBHOOK, State

__all__ = [
    "Claim",
    "ClaimBatch",
    "NewDelivery",
    "StoredDelivery",
    "column_text",
    "decode_callbacks",
]


def column_text(value: str) -> str:
    """`value` as both databases can hold it in a text column: NUL (which PostgreSQL
    refuses) and lone surrogates (which no UTF-8 column takes; pairs are joined) become
    U+FFFD. Only for text derived from a body or an error: a raw body is bytes and keeps
    every character."""
    if value.isascii():
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    try:
        value.encode()
    except UnicodeEncodeError:
        # A lone surrogate ("\ud800" in JSON, which JSON.stringify can emit).
        value = value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value.replace("\x00", "\ufffd")


@dataclass(frozen=True, slots=True)
class NewDelivery:
    """A verified, parsed delivery on its way into the store."""

    request_id: str
    gateway_request_id: str | None
    status: str
    error: str | None
    payload_error: str | None
    user_id: str | None
    body: bytes
    received_at: float
    source: str = SOURCE_WEBHOOK  # or "queue": recovered from fal's queue
    signed_at: int | None = None  # the timestamp fal signed a webhook with
    trace_context: str | None = None  # the traceparent it was received in (tracing on)


@dataclass(frozen=True, slots=True)
class Claim:
    """A delivery claimed for dispatch. Only the holder of `claim_id` may write it back."""

    request_id: str
    claim_id: str
    attempt: int
    status: str
    body: bytes
    user_id: str | None
    received_at: float
    completed_callbacks: tuple[str, ...]
    # The body already parsed, when the claim was taken as the delivery was inserted.
    parsed: dict[str, Any] | None = field(default=None, compare=False, repr=False)
    source: str = SOURCE_WEBHOOK
    signed_at: int | None = None
    # Where it was received, then submitted (W3C traceparents): its processing links there.
    trace_context: str | None = None


@dataclass(frozen=True, slots=True)
class ClaimBatch:
    claims: list[Claim]
    next_due_at: float | None  # earliest due_at of any pending or running delivery left


@dataclass(frozen=True, slots=True)
class StoredDelivery:
    """A stored delivery as operators see it (`falhook deliveries show`)."""

    request_id: str
    gateway_request_id: str | None
    status: str
    error: str | None
    payload_error: str | None
    user_id: str | None
    body: bytes
    received_at: float
    state: State
    attempts: int
    due_at: float
    claim_id: str | None
    last_error: str | None
    completed_callbacks: tuple[str, ...]
    updated_at: float
    finished_at: float | None
    source: str = SOURCE_WEBHOOK
    signed_at: int | None = None


def decode_callbacks(value: str | None) -> tuple[str, ...]:
    """The callbacks a delivery completed, from their stored form (a JSON list)."""
    return tuple(json.loads(value)) if value else ()
