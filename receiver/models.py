"""What is stored, and what a callback receives.

The SQLModel tables are the store's one schema, as migrations.py brings a database to it
(tests/receiver/test_migrations.py checks that the two agree). Every query is SQLAlchemy
Core against their ``__table__`` (the `*_TABLE` names below), never an ORM session: the
hot path compiles its statements once (store/statements.py), the operator queries run on
a SQLAlchemy connection (store/admin.py and its neighbours). This module sits below the
store: it imports no store module. `Delivery` is the immutable view handed to callbacks.

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

from falhook.receiver.archive.media import MediaItem
from falhook.receiver.state import SOURCE_QUEUE, SOURCE_WEBHOOK, State

__all__ = [
    "ACTIVE_PREDICATE",
    "ATTEMPTS",
    "BODIES",
    "CONTROL",
    "DELIVERIES",
    "EXPECTATIONS",
    "EXPECTATION_ACTIVE_PREDICATE",
    "SOURCE_QUEUE",
    "SOURCE_WEBHOOK",
    "AttemptRow",
    "BodyRow",
    "Delivery",
    "DeliveryRow",
    "DispatchControlRow",
    "ExpectationRow",
    "MediaPurgeRow",
    "MediaRow",
    "State",
]

# The active-state predicates, spelled with literals exactly as the partial indexes state
# them (ix_falhook_deliveries_active_due, ix_falhook_expectations_active_due): a planner
# can only use a partial index whose predicate the query implies, and a bound parameter
# implies nothing. Queries use them verbatim.
ACTIVE_PREDICATE = "state = 'pending' OR state = 'running'"
EXPECTATION_ACTIVE_PREDICATE = "state = 'waiting' OR state = 'polling'"


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
            postgresql_where=sa.text(ACTIVE_PREDICATE),
            sqlite_where=sa.text(ACTIVE_PREDICATE),
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

    __tablename__ = "falhook_expectations"
    __table_args__ = (
        sa.Index(
            "ix_falhook_expectations_active_due",
            "due_at",
            postgresql_where=sa.text(EXPECTATION_ACTIVE_PREDICATE),
            sqlite_where=sa.text(EXPECTATION_ACTIVE_PREDICATE),
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


class MediaRow(SQLModel, table=True):
    """One file found in an OK delivery's payload and its archiving (receiver/archive/),
    as migration 10 creates it; keyed by (request_id, the JSON pointer of its URL)."""

    __tablename__ = "falhook_media"
    __table_args__ = (sa.Index("ix_falhook_media_state_created", "state", "created_at"),)

    request_id: str = Field(primary_key=True, max_length=255)
    pointer: str = Field(primary_key=True)
    source_url: str
    stored_url: str | None = Field(default=None)
    state: str = Field(max_length=16)  # pending, archived, failed, skipped
    error: str | None = Field(default=None)
    sha256: str | None = Field(default=None, max_length=64)
    size: int | None = Field(default=None, sa_type=sa.BigInteger)
    content_type: str | None = Field(default=None)
    attempts: int = Field(default=0)  # downloads tried
    created_at: float
    updated_at: float
    finished_at: float | None = Field(default=None)  # archived, failed or skipped at


class MediaPurgeRow(SQLModel, table=True):
    """A delivery's purge at fal (FALHOOK_FAL_PURGE), as migration 10 creates it."""

    __tablename__ = "falhook_media_purges"

    request_id: str = Field(primary_key=True, max_length=255)
    state: str = Field(max_length=16)  # purged, failed
    status_code: int | None = Field(default=None)  # fal's answer, when it answered
    error: str | None = Field(default=None)
    attempts: int = Field(default=0)
    updated_at: float


class AttemptRow(SQLModel, table=True):
    """One dispatch attempt of a delivery (store/attempts.py), keyed by the delivery's
    sequential ``id``; written with the outcome it ends."""

    __tablename__ = "falhook_attempts"
    __table_args__ = (sa.Index("ix_falhook_attempts_delivery_id", "delivery_id", "id"),)

    id: int | None = Field(default=None, primary_key=True, sa_type=_key())
    delivery_id: int = Field(sa_type=sa.BigInteger)
    attempt: int
    started_at: float
    duration_seconds: float  # how long its callbacks ran
    outcome: str = Field(max_length=16)  # done, retry or dead
    error: str | None = Field(default=None)  # the first failure with its traceback
    next_attempt_at: float | None = Field(default=None)  # a retry's due time


class DispatchControlRow(SQLModel, table=True):
    """The store-wide dispatch switch (store/control.py): one row, id 1, seeded by
    migration 5."""

    __tablename__ = "falhook_dispatch_control"

    id: int = Field(primary_key=True, sa_column_kwargs={"autoincrement": False})
    paused: bool
    reason: str | None = Field(default=None)
    changed_at: float | None = Field(default=None)  # Unix seconds; None: never changed
    changed_by: str | None = Field(default=None)  # "cli", "console", "api"


# The tables as Core sees them: what every query is written against.
DELIVERIES: sa.Table = DeliveryRow.__table__  # type: ignore[attr-defined]
BODIES: sa.Table = BodyRow.__table__  # type: ignore[attr-defined]
EXPECTATIONS: sa.Table = ExpectationRow.__table__  # type: ignore[attr-defined]
ATTEMPTS: sa.Table = AttemptRow.__table__  # type: ignore[attr-defined]
CONTROL: sa.Table = DispatchControlRow.__table__  # type: ignore[attr-defined]


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
    media: tuple[MediaItem, ...] = ()
    """The payload's files and where each is archived (FALHOOK_ARCHIVE_URL; else empty)."""

    def stored_url(self, source_url: str) -> str | None:
        """Where the file fal served at `source_url` is archived, or None if it is not."""
        for item in self.media:
            if item.source_url == source_url and item.stored_url is not None:
                return item.stored_url
        return None

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
