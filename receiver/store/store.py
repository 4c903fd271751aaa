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
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa

from falhook.receiver.errors import StoreUnavailableError
from falhook.receiver.store.admin import Admin
from falhook.receiver.store.attempts import AttemptRecord, op_settle
from falhook.receiver.store.engine import brief, make_engine
from falhook.receiver.store.fileguard import FileGuard
from falhook.receiver.store.loop_writer import LoopWriter
from falhook.receiver.store.migrations import upgrade
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
from falhook.receiver.store.writer import Connection, Landed, Op, Writer

__all__ = ["Store"]


class Store(Admin):
    """Deliveries in SQLite or PostgreSQL, with an async group-commit API for the app.

    `start()` launches the writer thread (it connects lazily, so a database that is down
    at start does not stop the process); `stop()` drains and joins it. The sync methods
    (`list`, `get`, `replay`, `prune`, `counts`…) and `run`/`run_sync` (an operation of
    expectations.py) are `Admin`'s (admin.py), on pooled connections, for the console, the
    metrics gauges, the pruner, recovery and tests; they migrate the schema on first use
    unless it was checked. The store commands use an `Admin` of their own (no writer).
    """

    def __init__(
        self,
        url: str,
        *,
        max_batch: int = 512,
        on_due: Callable[[], None] | None = None,
    ) -> None:
        self.url = url
        super().__init__(make_engine(url))
        self._sql = Statements(self.engine.dialect)
        self._max_batch = max_batch
        self._on_due = on_due
        self._writer: Writer | None = None
        self._migrate_lock = threading.Lock()
        # One guard for every write of this process: the writer's commits and the sync
        # API's (a console's pause or replay), which would otherwise write through the
        # -shm mapping of an immutable file (SIGBUS), or into a deleted one.
        self._guard = FileGuard(self.engine.url.database if self.dialect == "sqlite" else None)

    # -- lifecycle ---------------------------------------------------------------------

    def migrate(self) -> int:
        """Create or upgrade the schema; idempotent and safe across processes."""
        with self._migrate_lock:
            try:
                version = upgrade(self.engine)
            except sa.exc.SQLAlchemyError as exc:
                raise StoreUnavailableError(f"cannot migrate the store: {brief(exc)}") from exc
            self.mark_schema_ready()
            return version

    def start(self) -> None:
        """Start the writer; the async methods may then be awaited on the calling loop."""
        if self._writer is not None:
            return
        strategy = LoopWriter if self.dialect == "sqlite" else ThreadWriter
        options: dict[str, Any] = {"guard": self._guard} if strategy is LoopWriter else {}
        self._writer = strategy(
            Connection(self.engine, self._ensure_schema),
            self._sql,
            on_due=self._on_due,
            max_batch=self._max_batch,
            **options,
        )
        self._writer.start()

    def _ensure_schema(self) -> None:
        if not self.schema_ready:
            self.migrate()

    def _prepare(self) -> None:
        # The sync API migrates on first use, unless the schema was checked.
        self._ensure_schema()

    def _guard_files(self) -> None:
        self._guard.opened()  # the file this process opened (no-op once known)
        self._guard.check()

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
        on_late: Callable[[Claim | None], None] | None = None,
    ) -> Claim | None:
        """Store a delivery durably, already claimed by `claim_id` (running, attempt 1,
        leased for `lease_seconds`): its claim, for the caller to dispatch at once, or
        None if its request_id was already stored.

        If the caller stops waiting (a timeout, the client gone), the insert still runs:
        `on_late` then gets its outcome (the claim; None for a duplicate or a failure), so
        that a row committed after all is not left leased to no one."""
        op: Op = op_insert_claimed(new, claim_id, lease_seconds, parsed)
        if on_late is not None:
            op = Landed(op, on_late)
        result: Claim | None = await self._submit(op)
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
        result: bool = await self._submit(op_settle(statement, params, attempt))
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

    async def ping(self) -> None:
        """Round-trip through the writer: raises StoreUnavailableError if it cannot."""

        await self._submit(op_ping)
