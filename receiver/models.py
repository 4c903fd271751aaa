"""What is stored, and what a callback receives.

`DeliveryRow` and `BodyRow` (SQLModel) define the tables. The hot path does not use ORM
sessions on them: the store compiles Core statements against their ``__table__`` once and
executes them directly (see store/statements.py). `Delivery` is the immutable view handed
to callbacks.

Why two tables: a delivery's raw body (~2 KB) never changes, while its state changes at
least once (running -> done). Kept in one row, every outcome rewrote the database page that
holds the body — a whole extra page written to the WAL per delivery, a large share of
ingestion throughput (bench/README, "Design figures"). Apart, the small state rows share
pages, so recording a batch of outcomes writes a page or two, and each body is written
exactly once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa
from sqlmodel import Field, SQLModel

from falhook.receiver.state import State

__all__ = [
    "SOURCE_QUEUE",
    "SOURCE_WEBHOOK",
    "BodyRow",
    "Delivery",
    "DeliveryRow",
    "State",
    "StoredDelivery",
]

SOURCE_WEBHOOK = "webhook"  # fal posted the delivery to /webhooks/fal
SOURCE_QUEUE = "queue"  # falhook fetched the result from fal's queue (no webhook came)


def _key() -> Any:
    # SQLite makes only a column declared exactly "INTEGER PRIMARY KEY" the rowid (the
    # table's own B-tree key, assigned in order); "BIGINT PRIMARY KEY" would be a separate
    # column with a second index. PostgreSQL gets a 64-bit identity.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class DeliveryRow(SQLModel, table=True):
    """One fal delivery's identity and dispatch state; unique (deduplicated) by request_id.

    `id` is a sequential key, so new rows land together on the table's last pages and the
    body row (`BodyRow`, same id) joins without touching the request_id index.
    """

    __tablename__ = "falhook_deliveries"
    # The schema itself is created by receiver/migrations.py (frozen DDL per version);
    # these mirror it, and tests/receiver/test_migrations.py checks that they agree.
    __table_args__ = (
        sa.Index("ix_falhook_deliveries_state_due", "state", "due_at"),
        sa.Index(
            "ix_falhook_deliveries_active_due",
            "due_at",
            postgresql_where=sa.text("state = 'pending' OR state = 'running'"),
            sqlite_where=sa.text("state = 'pending' OR state = 'running'"),
        ),
        sa.Index("ix_falhook_deliveries_received_at", "received_at"),
        sa.Index(
            "ix_falhook_deliveries_dead_received",
            "received_at",
            postgresql_where=sa.text("state = 'dead'"),
            sqlite_where=sa.text("state = 'dead'"),
        ),
        sa.Index("ux_falhook_deliveries_request_id", "request_id", unique=True),
    )

    id: int | None = Field(default=None, primary_key=True, sa_type=_key())
    request_id: str = Field(max_length=255)
    gateway_request_id: str | None = Field(default=None)
    status: str = Field(max_length=16)  # "OK" | "ERROR", as fal sent it
    error: str | None = Field(default=None)
    payload_error: str | None = Field(default=None)
    user_id: str | None = Field(default=None)  # the fal user the delivery was signed for
    received_at: float  # Unix seconds when the delivery was stored
    state: str = Field(default=State.PENDING.value, max_length=16)
    attempts: int = Field(default=0)  # dispatch attempts started so far
    due_at: float  # pending: next attempt; running: lease expiry
    claim_id: str | None = Field(default=None)  # fences a claim: only its holder may write
    last_error: str | None = Field(default=None)
    completed_callbacks: str | None = Field(default=None)  # JSON list of callbacks done
    updated_at: float
    finished_at: float | None = Field(default=None)  # when it became done or dead
    # How it came: "webhook" (fal posted it) or "queue" (falhook fetched it from fal's
    # queue, see receiver/recovery/). The default keeps the webhook insert unchanged.
    source: str = Field(
        default=SOURCE_WEBHOOK, max_length=16, sa_column_kwargs={"server_default": SOURCE_WEBHOOK}
    )
    # The timestamp fal signed the delivery with (X-Fal-Webhook-Timestamp, Unix seconds);
    # None when it came from fal's queue, or was stored before falhook kept it.
    signed_at: int | None = Field(default=None, sa_type=sa.BigInteger)


class BodyRow(SQLModel, table=True):
    """A delivery's raw body, byte for byte as received; written once, never updated.

    No foreign key: SQLite enforces none unless asked per connection, and the store writes
    and deletes both rows of a delivery in the same transaction.
    """

    __tablename__ = "falhook_bodies"

    id: int = Field(primary_key=True, sa_type=_key(), sa_column_kwargs={"autoincrement": False})
    body: bytes = Field(sa_type=sa.LargeBinary)


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


@dataclass(frozen=True, slots=True)
class Delivery:
    """What a callback receives: one fal result, parsed from the stored raw body."""

    request_id: str
    gateway_request_id: str | None
    status: Literal["OK", "ERROR"]
    payload: Any
    error: str | None
    payload_error: str | None
    received_at: datetime
    attempt: int
    raw_body: bytes = field(repr=False)
    user_id: str | None = None
    source: str = SOURCE_WEBHOOK
    """``"webhook"`` (fal posted it) or ``"queue"`` (recovered from fal's queue)."""
    signed_at: int | None = None
    """The Unix time fal signed a webhook with (``X-Fal-Webhook-Timestamp``); None for
    a result recovered from fal's queue."""

    @property
    def ok(self) -> bool:
        """True for a successful model result (``status == "OK"``)."""
        return self.status == "OK"

    def json(self) -> dict[str, Any]:
        """The whole body as fal sent it, unknown fields included."""
        parsed: dict[str, Any] = json.loads(self.raw_body)
        return parsed

    @classmethod
    def from_body(
        cls,
        body: bytes,
        *,
        attempt: int,
        received_at: float,
        user_id: str | None = None,
        parsed: dict[str, Any] | None = None,
        source: str = SOURCE_WEBHOOK,
        signed_at: int | None = None,
    ) -> Delivery:
        data = parsed if parsed is not None else json.loads(body)
        return cls(
            request_id=data["request_id"],
            gateway_request_id=data.get("gateway_request_id"),
            status=data["status"],
            payload=data.get("payload"),
            error=data.get("error"),
            payload_error=data.get("payload_error"),
            received_at=datetime.fromtimestamp(received_at, UTC),
            attempt=attempt,
            raw_body=body,
            user_id=user_id,
            source=source,
            signed_at=signed_at,
        )
