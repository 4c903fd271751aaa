"""The delivery store: one object over the tables, the writer and the admin queries.

Why group commit: a durable commit costs one fsync, and committing each request alone
caps a receiver far below what verification allows (bench/ measures both). Every write from
the app goes through one writer (writer.py), which runs every operation queued by then
in one transaction, commits once, then resolves all their futures. Each request still
answers only after its own row is durable.

Every foreign exception is wrapped as `StoreUnavailableError` at this edge.
"""

from __future__ import annotations

import asyncio
import builtins
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa

from falhook.receiver.errors import StoreSchemaError, StoreUnavailableError
from falhook.receiver.models import StoredDelivery
from falhook.receiver.state import State
from falhook.receiver.store import admin
from falhook.receiver.store.attempts import (
    AttemptRecord,
    StoredAttempt,
    list_attempts,
    op_settle,
)
from falhook.receiver.store.control import DispatchControl, read_control, write_control
from falhook.receiver.store.engine import make_engine
from falhook.receiver.store.loop_writer import LoopWriter
from falhook.receiver.store.migrations import MIGRATIONS, current_version, upgrade
from falhook.receiver.store.operations import (
    encode_callbacks,
    op_claim,
    op_fenced,
    op_insert,
    op_insert_claimed,
    op_ping,
)
from falhook.receiver.store.records import Claim, ClaimBatch, NewDelivery
from falhook.receiver.store.statements import Statements
from falhook.receiver.store.thread_writer import ThreadWriter
from falhook.receiver.store.writer import Connection, Op, Writer, brief

__all__ = ["Store"]

_T = TypeVar("_T")


class Store:
    """Deliveries in SQLite or PostgreSQL, with an async group-commit API for the app.

    `start()` launches the writer thread (it connects lazily, so a database that is down
    at start does not stop the process); `stop()` drains and joins it. The sync methods
    (`list`, `get`, `replay`, `prune`, `counts`) open their own connections and are for
    the CLI and tests.
    """

    def __init__(
        self,
        url: str,
        *,
        max_batch: int = 512,
        on_due: Callable[[], None] | None = None,
    ) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        self._sql = Statements(self.engine.dialect)
        self._max_batch = max_batch
        self._on_due = on_due
        self._writer: Writer | None = None
        self._schema_ready = False  # migrated, or checked to be current
        self._migrate_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------

    def migrate(self) -> int:
        """Create or upgrade the schema; idempotent and safe across processes."""
        with self._migrate_lock:
            try:
                version = upgrade(self.engine)
            except sa.exc.SQLAlchemyError as exc:
                raise StoreUnavailableError(f"cannot migrate the store: {brief(exc)}") from exc
            self._schema_ready = True
            return version

    def check_schema(self) -> int:
        """Check, changing nothing, that the schema is the one this falhook writes.

        For the store commands, which must not create or upgrade a schema (only `serve`
        migrates): raises StoreSchemaError when there is none, or an older or newer one.
        """
        latest = MIGRATIONS[-1].version
        try:
            with self.engine.connect() as conn:
                version = current_version(conn)
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailableError(f"cannot connect: {brief(exc)}") from exc
        if version == 0:
            raise StoreSchemaError(
                "no falhook tables in this database (`falhook serve` creates them when it "
                "starts): is --database-url / FALHOOK_DATABASE_URL the right one?"
            )
        if version < latest:
            raise StoreSchemaError(
                f"the store's schema is version {version}, this falhook needs {latest}: start "
                "this version's `falhook serve` once (it upgrades the schema), then retry"
            )
        if version > latest:
            raise StoreSchemaError(
                f"the store's schema is version {version}, newer than this falhook knows "
                f"({latest}): upgrade falhook"
            )
        self._schema_ready = True
        return version

    @property
    def schema_ready(self) -> bool:
        """The schema is known to be current (this object migrated or checked it)."""
        return self._schema_ready

    def start(self) -> None:
        """Start the writer; the async methods may then be awaited on the calling loop."""
        if self._writer is not None:
            return
        strategy = LoopWriter if self.dialect == "sqlite" else ThreadWriter
        self._writer = strategy(
            Connection(self.engine, self._ensure_schema),
            self._sql,
            on_due=self._on_due,
            max_batch=self._max_batch,
        )
        self._writer.start()

    def _ensure_schema(self) -> None:
        if not self._schema_ready:
            self.migrate()

    async def stop(self) -> None:
        """Let queued operations finish, then stop the writer and close connections."""
        writer, self._writer = self._writer, None
        if writer is not None:
            await writer.stop()
        self.engine.dispose()

    # -- async API (the app) -----------------------------------------------------------

    def _submit(self, op: Op) -> asyncio.Future[Any]:
        if self._writer is None:
            raise StoreUnavailableError("the store is not started")
        return self._writer.submit(op)

    async def insert(self, new: NewDelivery) -> bool:
        """Store a delivery durably. True if new, False if its request_id was already stored.

        A new delivery is pending: `on_due` runs after the commit (and other replicas are
        told), so a dispatcher claims it.
        """
        result: bool = await self._submit(op_insert(new))
        return result

    async def insert_claimed(
        self,
        new: NewDelivery,
        claim_id: str,
        *,
        lease_seconds: float = 60.0,
        parsed: dict[str, Any] | None = None,
    ) -> Claim | None:
        """Store a delivery durably, already claimed by `claim_id` (running, attempt 1,
        leased for `lease_seconds`): its claim, for the caller to dispatch at once, or
        None if its request_id was already stored."""
        result: Claim | None = await self._submit(
            op_insert_claimed(new, claim_id, lease_seconds, parsed)
        )
        return result

    async def claim(self, limit: int, lease_seconds: float) -> ClaimBatch:
        """Claim up to `limit` due deliveries (pending, or running with an expired lease)."""
        result: ClaimBatch = await self._submit(op_claim(uuid.uuid4().hex, limit, lease_seconds))
        return result

    async def _fenced(self, statement: str, params: dict[str, Any]) -> bool:
        result: bool = await self._submit(op_fenced(statement, params))
        return result

    async def renew(self, claim: Claim, lease_seconds: float) -> bool:
        """Extend a claim's lease. False if the claim was lost (taken over or finished)."""
        return await self._fenced(
            "renew",
            {
                "request_id": claim.request_id,
                "claim": claim.claim_id,
                "lease_until": time.time() + lease_seconds,
            },
        )

    async def _settle(
        self, statement: str, params: dict[str, Any], attempt: AttemptRecord | None
    ) -> bool:
        if attempt is None:
            return await self._fenced(statement, params)
        # The attempt is written by the same operation as its outcome: one transaction.
        result: bool = await self._submit(
            op_settle(statement, params, attempt, dialect=self.dialect)
        )
        return result

    async def finish(
        self,
        claim: Claim,
        completed: Iterable[str] = (),
        *,
        attempt: AttemptRecord | None = None,
    ) -> bool:
        """Mark done (and keep `attempt`). False if the claim was lost: nothing changed."""
        return await self._settle(
            "finish",
            {
                "request_id": claim.request_id,
                "claim": claim.claim_id,
                "completed_callbacks": encode_callbacks(completed),
            },
            attempt,
        )

    async def reschedule(
        self,
        claim: Claim,
        due_at: float,
        error: str,
        completed: Iterable[str] = (),
        *,
        attempt: AttemptRecord | None = None,
    ) -> bool:
        """Put back to pending for another attempt at `due_at`, keeping the error."""
        return await self._settle(
            "reschedule",
            {
                "request_id": claim.request_id,
                "claim": claim.claim_id,
                "due_at": due_at,
                "last_error": error,
                "completed_callbacks": encode_callbacks(completed),
            },
            attempt,
        )

    async def bury(
        self,
        claim: Claim,
        error: str,
        completed: Iterable[str] = (),
        *,
        attempt: AttemptRecord | None = None,
    ) -> bool:
        """Mark dead (out of attempts), keeping the last error; `replay` revives it."""
        return await self._settle(
            "bury",
            {
                "request_id": claim.request_id,
                "claim": claim.claim_id,
                "last_error": error,
                "completed_callbacks": encode_callbacks(completed),
            },
            attempt,
        )

    async def run(self, op: Op) -> Any:
        """Run one operation in the writer's next transaction (for store modules such as
        expectations.py, whose statements live beside their tables)."""
        return await self._submit(op)

    async def ping(self) -> None:
        """Round-trip through the writer: raises StoreUnavailableError if it cannot."""

        await self._submit(op_ping)

    # -- sync API (CLI, tests, health): each call opens its own connection ----------------

    def _connect(self) -> sa.Connection:
        if not self._schema_ready:
            self.migrate()
        try:
            return self.engine.connect()
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailableError(f"cannot connect: {brief(exc)}") from exc

    def get(self, request_id: str) -> StoredDelivery | None:
        """One stored delivery, or None."""
        return self._read(admin.get, request_id)

    def attempts(self, request_id: str) -> builtins.list[StoredAttempt]:
        """A delivery's dispatch attempts, oldest first (empty if none, or no delivery)."""
        return self._read(list_attempts, request_id)

    def list(
        self,
        *,
        states: Sequence[State] = (),
        since: float | None = None,
        limit: int | None = 100,
    ) -> builtins.list[StoredDelivery]:
        """Stored deliveries, newest first, filtered by state and received time."""
        return self._read(admin.list_deliveries, states=states, since=since, limit=limit)

    def counts(self) -> dict[State, int]:
        """Number of deliveries in each state (every state present, zero if none)."""
        return self._read(admin.counts)

    def dispatch_control(self) -> DispatchControl:
        """The store-wide dispatch switch as it is now (paused or not, and why)."""
        return self._read(read_control)

    def set_dispatch_paused(
        self, paused: bool, *, reason: str | None = None, by: str | None = None
    ) -> DispatchControl:
        """Pause or resume dispatch for every replica on this store; return the new state."""
        return self._write(write_control, paused=paused, reason=reason, by=by)

    def oldest_pending_age(self, now: float | None = None) -> float:
        """Seconds since the oldest not-yet-finished delivery was received (0 if none)."""
        return self._read(admin.oldest_pending_age, now)

    def replay(
        self,
        request_ids: Sequence[str] = (),
        *,
        states: Sequence[State] = (),
        since: float | None = None,
    ) -> dict[str, State]:
        """Re-queue finished deliveries for dispatch now; return each one's previous state.

        Idempotent: pending or running deliveries are left alone (and not returned), so
        replaying twice queues once. Attempts start again from zero.
        """
        return self._write(
            admin.replay, request_ids, states=states, since=since, notify=self._sql.notify
        )

    def prune(self, older_than: float, *, states: Sequence[State] = (State.DONE,)) -> int:
        """Delete finished deliveries that finished more than `older_than` seconds ago.

        Never deletes pending or running deliveries, whatever `states` says.
        """
        return self._write(admin.prune, older_than, states=states)

    def prune_batch(self, older_than: float, limit: int) -> int | None:
        """One small transaction of retention pruning (done only, as `prune`); None when
        another replica is pruning (PostgreSQL)."""
        return self._write(admin.prune_batch, older_than, limit)

    def _read(self, query: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        try:
            with self._connect() as conn:
                return query(conn, *args, **kwargs)
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailableError(brief(exc)) from exc

    def _write(self, change: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        try:
            with self._connect() as conn, conn.begin():
                return change(conn, *args, **kwargs)
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailableError(brief(exc)) from exc
