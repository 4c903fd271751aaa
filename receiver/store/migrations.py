"""Versioned schema migrations, for SQLite and PostgreSQL alike.

Each migration is frozen once released: it states the DDL of its own version (never
``SQLModel.metadata.create_all``, which would follow the *current* models), so a database
written by any older falhook is brought forward step by step. The applied version is kept
in ``falhook_schema_version``. Replicas starting together serialize on a transaction-level
advisory lock (PostgreSQL) or an immediate write lock (SQLite).

Only `falhook serve` (a `Store`) migrates; the store commands check the version, changing
nothing (`check_version`). Neither works on a store newer than it knows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa

from falhook.receiver.errors import StoreSchemaError

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "VERSIONS",
    "VERSION_TABLE",
    "Migration",
    "check_not_newer",
    "check_version",
    "current_version",
    "upgrade",
]

_ADVISORY_LOCK_KEY = 0x46A1_400C  # arbitrary constant: "falhook migrations"


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[sa.Connection], None]


def _v1_deliveries(conn: sa.Connection) -> None:
    metadata = sa.MetaData()
    sa.Table(
        "falhook_deliveries",
        metadata,
        sa.Column("request_id", sa.String(255), primary_key=True),
        sa.Column("gateway_request_id", sa.String, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.String, nullable=True),
        sa.Column("payload_error", sa.String, nullable=True),
        sa.Column("user_id", sa.String, nullable=True),
        sa.Column("body", sa.LargeBinary, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("due_at", sa.Float, nullable=False),
        sa.Column("claim_id", sa.String, nullable=True),
        sa.Column("last_error", sa.String, nullable=True),
        sa.Column("completed_callbacks", sa.String, nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float, nullable=True),
        sa.Index("ix_falhook_deliveries_state_due", "state", "due_at"),
    )
    metadata.create_all(conn)


def _v2_indexes(conn: sa.Connection) -> None:
    # Claims and the dispatcher's next-due query read only active rows, ordered by due_at:
    # a partial index holds just those (done rows, the vast majority, are not in it). Its
    # predicate is spelled exactly as the store's queries spell it (store.ACTIVE_PREDICATE),
    # so both SQLite and PostgreSQL can prove the query implies it.
    # received_at serves `deliveries list` (newest first), replay --since and the oldest
    # pending age.
    predicate = sa.text("state = 'pending' OR state = 'running'")
    metadata = sa.MetaData()
    table = sa.Table(
        "falhook_deliveries",
        metadata,
        sa.Column("state", sa.String(16)),
        sa.Column("due_at", sa.Float),
        sa.Column("received_at", sa.Float),
    )
    sa.Index(
        "ix_falhook_deliveries_active_due",
        table.c.due_at,
        postgresql_where=predicate,
        sqlite_where=predicate,
    ).create(conn)
    sa.Index("ix_falhook_deliveries_received_at", table.c.received_at).create(conn)


_V3_STATE_COLUMNS = (
    "request_id",
    "gateway_request_id",
    "status",
    "error",
    "payload_error",
    "user_id",
    "received_at",
    "state",
    "attempts",
    "due_at",
    "claim_id",
    "last_error",
    "completed_callbacks",
    "updated_at",
    "finished_at",
)


def _v3_bodies_apart(conn: sa.Connection) -> None:
    # The raw body moves to its own table, joined by a new sequential integer key, so that
    # recording an outcome no longer rewrites the page holding the ~2 KB body (see
    # models.py). Changing a primary key needs a new table on SQLite; the same rebuild is
    # used on PostgreSQL so both follow one path. Ids are given in received order.
    key = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    metadata = sa.MetaData()
    old = sa.Table(
        "falhook_deliveries",
        metadata,
        sa.Column("body", sa.LargeBinary),
        *(sa.Column(name) for name in _V3_STATE_COLUMNS),
    )
    new = sa.Table(
        "falhook_deliveries_v3",
        metadata,
        sa.Column("id", key, primary_key=True),
        sa.Column("request_id", sa.String(255), nullable=False),
        sa.Column("gateway_request_id", sa.String, nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.String, nullable=True),
        sa.Column("payload_error", sa.String, nullable=True),
        sa.Column("user_id", sa.String, nullable=True),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("due_at", sa.Float, nullable=False),
        sa.Column("claim_id", sa.String, nullable=True),
        sa.Column("last_error", sa.String, nullable=True),
        sa.Column("completed_callbacks", sa.String, nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float, nullable=True),
    )
    bodies = sa.Table(
        "falhook_bodies",
        metadata,
        sa.Column("id", key, primary_key=True, autoincrement=False),
        sa.Column("body", sa.LargeBinary, nullable=False),
    )
    new.create(conn)
    bodies.create(conn)
    state = [old.c[name] for name in _V3_STATE_COLUMNS]
    conn.execute(
        new.insert().from_select(
            list(_V3_STATE_COLUMNS),
            sa.select(*state).order_by(old.c.received_at, old.c.request_id),
        )
    )
    conn.execute(
        bodies.insert().from_select(
            ["id", "body"],
            sa.select(new.c.id, old.c.body).join(old, old.c.request_id == new.c.request_id),
        )
    )
    old.drop(conn)  # and its indexes, whose names the new table takes below
    conn.exec_driver_sql("ALTER TABLE falhook_deliveries_v3 RENAME TO falhook_deliveries")
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(
            "ALTER TABLE falhook_deliveries "
            "RENAME CONSTRAINT falhook_deliveries_v3_pkey TO falhook_deliveries_pkey"
        )
        conn.exec_driver_sql(
            "ALTER SEQUENCE falhook_deliveries_v3_id_seq RENAME TO falhook_deliveries_id_seq"
        )
    table = sa.Table(
        "falhook_deliveries",
        sa.MetaData(),
        sa.Column("request_id", sa.String(255)),
        sa.Column("state", sa.String(16)),
        sa.Column("due_at", sa.Float),
        sa.Column("received_at", sa.Float),
    )
    predicate = sa.text("state = 'pending' OR state = 'running'")  # as in migration 2
    for index in (
        sa.Index("ux_falhook_deliveries_request_id", table.c.request_id, unique=True),
        sa.Index("ix_falhook_deliveries_state_due", table.c.state, table.c.due_at),
        sa.Index(
            "ix_falhook_deliveries_active_due",
            table.c.due_at,
            postgresql_where=predicate,
            sqlite_where=predicate,
        ),
        sa.Index("ix_falhook_deliveries_received_at", table.c.received_at),
    ):
        index.create(conn)


def _v4_expectations(conn: sa.Connection) -> None:
    # Recovery from fal's queue (receiver/recovery/): where each delivery came from, and the
    # requests falhook expects a result for. The source column's server default keeps the
    # webhook insert, and every row written before this migration, "webhook".
    conn.exec_driver_sql(
        "ALTER TABLE falhook_deliveries ADD COLUMN source VARCHAR(16) DEFAULT 'webhook' NOT NULL"
    )
    metadata = sa.MetaData()
    table = sa.Table(
        "falhook_expectations",
        metadata,
        sa.Column("request_id", sa.String(255), primary_key=True),
        sa.Column("endpoint_id", sa.String, nullable=False),
        sa.Column("status_url", sa.String, nullable=True),
        sa.Column("response_url", sa.String, nullable=True),
        sa.Column("origin", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("due_at", sa.Float, nullable=False),
        sa.Column("polls", sa.Integer, nullable=False),
        sa.Column("queue_status", sa.String(16), nullable=True),
        sa.Column("completed_at", sa.Float, nullable=True),
        sa.Column("queue_error", sa.String, nullable=True),
        sa.Column("claim_id", sa.String, nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float, nullable=True),
    )
    # The poller claims active rows by due_at: a partial index holds only those, with the
    # predicate spelled exactly as expectations.ACTIVE_PREDICATE spells it.
    predicate = sa.text("state = 'waiting' OR state = 'polling'")
    sa.Index(
        "ix_falhook_expectations_active_due",
        table.c.due_at,
        postgresql_where=predicate,
        sqlite_where=predicate,
    )
    sa.Index("ix_falhook_expectations_created_at", table.c.created_at)
    metadata.create_all(conn)


def _v5_dispatch_control(conn: sa.Connection) -> None:
    # The store-wide pause switch (store/control.py): one row, seeded "not paused", so
    # reading it never has to guess.
    metadata = sa.MetaData()
    control = sa.Table(
        "falhook_dispatch_control",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("paused", sa.Boolean, nullable=False),
        sa.Column("reason", sa.String, nullable=True),
        sa.Column("changed_at", sa.Float, nullable=True),
        sa.Column("changed_by", sa.String, nullable=True),
    )
    control.create(conn)
    conn.execute(control.insert().values(id=1, paused=False))
    # The console's "dead deliveries, newest first" (what an operator opens after a dead
    # delivery alert) would otherwise walk the received_at index past every done row: a
    # full scan of a million-row store when nothing or little is dead. Dead rows are few,
    # and no delivery is dead on the hot path (inserts and done rows are not in it).
    table = sa.Table(
        "falhook_deliveries",
        metadata,
        sa.Column("state", sa.String(16)),
        sa.Column("received_at", sa.Float),
    )
    dead = sa.text("state = 'dead'")
    sa.Index(
        "ix_falhook_deliveries_dead_received",
        table.c.received_at,
        postgresql_where=dead,
        sqlite_where=dead,
    ).create(conn)


def _v6_attempts(conn: sa.Connection) -> None:
    # Every dispatch attempt, not only the last error (store/attempts.py), keyed by the
    # delivery's sequential id; listed per delivery, oldest first.
    metadata = sa.MetaData()
    sa.Table(
        "falhook_attempts",
        metadata,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("delivery_id", sa.BigInteger, nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("duration_seconds", sa.Float, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("error", sa.String, nullable=True),
        sa.Column("next_attempt_at", sa.Float, nullable=True),
        sa.Index("ix_falhook_attempts_delivery_id", "delivery_id", "id"),
    )
    metadata.create_all(conn)


def _v7_signed_at(conn: sa.Connection) -> None:
    # fal's X-Fal-Webhook-Timestamp (Unix seconds), kept so a forward can pass it on and
    # an operator can see it. NULL for deliveries from before, and for those recovered
    # from fal's queue (nothing was signed).
    conn.exec_driver_sql("ALTER TABLE falhook_deliveries ADD COLUMN signed_at BIGINT")


def _v8_rearm(conn: sa.Connection) -> None:
    # 1 once a duplicate came while the delivery was pending or running: fal sent it again,
    # so if its callbacks end up giving up, they get another set of attempts, as they do
    # for a duplicate that comes after (store/operations.py). Cleared when they succeed.
    conn.exec_driver_sql(
        "ALTER TABLE falhook_deliveries ADD COLUMN rearm INTEGER DEFAULT 0 NOT NULL"
    )


def _v9_trace_context(conn: sa.Connection) -> None:
    # OpenTelemetry (receiver/tracing/): the W3C traceparent a delivery was received in
    # (then, space-separated, its submit's), and the one an expectation was submitted in,
    # so that its processing, later or on another replica, links to both. NULL without
    # tracing.
    for table in ("falhook_deliveries", "falhook_expectations"):
        conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN trace_context VARCHAR")


def _v10_media(conn: sa.Connection) -> None:
    # The media archive (receiver/archive/): one row per file found in an OK delivery's
    # payload, keyed by the JSON pointer of its URL; the state index serves the pending
    # gauges and `falhook media list --state`.
    metadata = sa.MetaData()
    sa.Table(
        "falhook_media",
        metadata,
        sa.Column("request_id", sa.String(255), primary_key=True),
        sa.Column("pointer", sa.String, primary_key=True),
        sa.Column("source_url", sa.String, nullable=False),
        sa.Column("stored_url", sa.String, nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error", sa.String, nullable=True),
        sa.Column("sha256", sa.String(64), nullable=True),
        sa.Column("size", sa.BigInteger, nullable=True),
        sa.Column("content_type", sa.String, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.Column("finished_at", sa.Float, nullable=True),
        sa.Index("ix_falhook_media_state_created", "state", "created_at"),
    )
    # FALHOOK_FAL_PURGE: each delivery's purge at fal, once its files are archived.
    sa.Table(
        "falhook_media_purges",
        metadata,
        sa.Column("request_id", sa.String(255), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer, nullable=True),
        sa.Column("error", sa.String, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    metadata.create_all(conn)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "deliveries table", _v1_deliveries),
    Migration(2, "partial index on due_at for active rows; index on received_at", _v2_indexes),
    Migration(3, "bodies apart from dispatch state, joined by a sequential id", _v3_bodies_apart),
    Migration(4, "delivery source; expectations for recovery from fal's queue", _v4_expectations),
    Migration(
        5, "dispatch pause switch; partial index on received_at of dead rows", _v5_dispatch_control
    ),
    Migration(6, "attempts: every dispatch attempt of a delivery", _v6_attempts),
    Migration(7, "signed_at: the timestamp fal signed a delivery with", _v7_signed_at),
    Migration(8, "rearm: a duplicate came while the delivery was in flight", _v8_rearm),
    Migration(9, "trace_context: where deliveries and expectations were traced", _v9_trace_context),
    Migration(
        10, "media: each delivery's files, where they are archived, its purge at fal", _v10_media
    ),
)


# The version this falhook writes.
SCHEMA_VERSION = MIGRATIONS[-1].version

# The migrations applied: created before the first one, never migrated itself.
VERSION_TABLE = "falhook_schema_version"
VERSIONS = sa.Table(
    VERSION_TABLE,
    sa.MetaData(),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("description", sa.String, nullable=False),
    sa.Column("applied_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
)


def current_version(conn: sa.Connection) -> int:
    """The highest applied migration, 0 for a database without falhook's tables (a table
    visible on the search_path, on PostgreSQL)."""
    if not conn.dialect.has_table(conn, VERSION_TABLE):
        return 0
    found = conn.execute(sa.select(sa.func.coalesce(sa.func.max(VERSIONS.c.version), 0)))
    return int(found.scalar_one())


def check_version(version: int, known: int = SCHEMA_VERSION) -> None:
    """StoreSchemaError unless `version` is the one this falhook writes, saying what to do."""
    if version == 0:
        raise StoreSchemaError(
            "no falhook tables in this database (`falhook serve` creates them when it "
            "starts): is --database-url / FALHOOK_DATABASE_URL the right one?"
        )
    if version < known:
        raise StoreSchemaError(
            f"the store's schema is version {version}, this falhook needs {known}: "
            "start this version's `falhook serve` once (it upgrades the schema), then retry"
        )
    check_not_newer(version, known)


def check_not_newer(version: int, known: int = SCHEMA_VERSION) -> None:
    """StoreSchemaError if a later falhook wrote the store (this one would misread it)."""
    if version > known:
        raise StoreSchemaError(
            f"the store's schema is version {version}, newer than this falhook knows "
            f"({known}): upgrade falhook"
        )


def upgrade(engine: sa.Engine, migrations: tuple[Migration, ...] = MIGRATIONS) -> int:
    """Apply every migration newer than the database's version; return the final version.
    StoreSchemaError for a database newer than `migrations` (a later falhook wrote it)."""
    try:
        return _upgrade(engine, migrations)
    except (sa.exc.OperationalError, sa.exc.IntegrityError):
        # SQLite has no advisory lock: another process (a second `falhook`) may have
        # migrated between our check and our DDL. Once more sees its work and does nothing.
        if engine.dialect.name != "sqlite":
            raise
        return _upgrade(engine, migrations)


def _upgrade(engine: sa.Engine, migrations: tuple[Migration, ...]) -> int:
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # Another replica may be migrating a large store: wait for it, however long
            # (the connections' lock_timeout is for deliveries, not for this).
            conn.exec_driver_sql("SET LOCAL lock_timeout = 0")
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK_KEY})
        elif conn.dialect.name == "sqlite":
            # Take the write lock before reading the version: with the driver's deferred
            # transaction, processes starting together all read version 0 and then race to
            # CREATE TABLE. (pysqlite sends no BEGIN of its own before DDL or SELECT.)
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        VERSIONS.create(conn, checkfirst=True)
        version = current_version(conn)
        check_not_newer(version, migrations[-1].version)
        for migration in migrations:
            if migration.version <= version:
                continue
            migration.apply(conn)
            conn.execute(
                VERSIONS.insert().values(
                    version=migration.version, description=migration.description
                )
            )
            version = migration.version
        return version
