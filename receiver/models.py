"""What is stored, and what a callback receives.

`DeliveryRow`, `BodyRow` and `ExpectationRow` (SQLModel) and `ATTEMPTS` (Core) declare the
tables as migrations.py creates them (tests/receiver/test_migrations.py checks that the two
agree). The hot path does not use ORM sessions on them: the store compiles Core statements
against their ``__table__`` once and executes them directly (see store/statements.py).
The operator queries (store/admin.py and its neighbours) are plain SQL and never import
this module: SQLModel and pydantic take longer to import than a store command may take.
`Delivery` is the immutable view handed to callbacks.

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

from falhook.receiver.state import SOURCE_QUEUE, SOURCE_WEBHOOK, State
from falhook.receiver.store import attempts, expectations
from falhook.receiver.store.records import StoredDelivery

__all__ = [
    "ATTEMPTS",
    "SOURCE_QUEUE",
    "SOURCE_WEBHOOK",
    "BodyRow",
    "Delivery",
    "DeliveryRow",
    "ExpectationRow",
    "State",
    "StoredDelivery",
]


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
    # 1: a duplicate came while pending or running; giving up then re-arms instead
    rearm: int = Field(default=0)
    # The traceparent it was received in, then its submit's (receiver/tracing/); or None
    trace_context: str | None = Field(default=None)


class BodyRow(SQLModel, table=True):
    """A delivery's raw body, byte for byte as received; written once, never updated.

    No foreign key: SQLite enforces none unless asked per connection, and the store writes
    and deletes both rows of a delivery in the same transaction.
    """

    __tablename__ = "falhook_bodies"

    id: int = Field(primary_key=True, sa_type=_key(), sa_column_kwargs={"autoincrement": False})
    body: bytes = Field(sa_type=sa.LargeBinary)


class ExpectationRow(SQLModel, table=True):
    """A request falhook expects a result for (store/expectations.py), as migration 4
    creates it."""

    __tablename__ = expectations.TABLE_NAME
    __table_args__ = (
        sa.Index(
            "ix_falhook_expectations_active_due",
            "due_at",
            postgresql_where=sa.text(expectations.ACTIVE_PREDICATE),
            sqlite_where=sa.text(expectations.ACTIVE_PREDICATE),
        ),
        sa.Index("ix_falhook_expectations_created_at", "created_at"),
    )

    request_id: str = Field(primary_key=True, max_length=255)
    endpoint_id: str
    status_url: str | None = Field(default=None)  # as fal returned it, when known
    response_url: str | None = Field(default=None)
    origin: str = Field(max_length=16)  # "submit" or "expect"
    state: str = Field(max_length=16)
    reason: str | None = Field(default=None)  # why failed/expired; what recovered it
    created_at: float
    expires_at: float  # created_at + FALHOOK_EXPECT_TTL_SECONDS
    due_at: float  # active: next poll (or, claimed, the lease expiry)
    polls: int = Field(default=0)  # status polls made
    queue_status: str | None = Field(default=None, max_length=16)  # last status fal said
    completed_at: float | None = Field(default=None)  # when a poll first saw COMPLETED
    # COMPLETED with an error: {"error": …, "error_type": …} as fal's status said (JSON).
    queue_error: str | None = Field(default=None)
    claim_id: str | None = Field(default=None)
    updated_at: float
    finished_at: float | None = Field(default=None)
    trace_context: str | None = Field(default=None)  # the traceparent of its submit


# Every dispatch attempt of a delivery (store/attempts.py), as migration 6 creates it.
ATTEMPTS = sa.Table(
    attempts.TABLE_NAME,
    sa.MetaData(),
    sa.Column("id", _key(), primary_key=True),
    sa.Column("delivery_id", sa.BigInteger, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("duration_seconds", sa.Float, nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("error", sa.String, nullable=True),
    sa.Column("next_attempt_at", sa.Float, nullable=True),
    sa.Index("ix_falhook_attempts_delivery_id", "delivery_id", "id"),
)


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
