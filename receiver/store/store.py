"""The delivery store: SQLModel tables, written through one group-committing writer.

Why group commit: a durable commit costs one fsync (about 0.3-2 ms), and committing each
request alone caps a receiver at a few thousand requests per second. Every write goes
through one writer (writer.py), which runs every operation queued by then in one
transaction, commits once, then resolves all their futures. Each request still answers
only after its own row is durable.

Why raw DBAPI cursors: the statements are SQLAlchemy Core, built against the SQLModel
table and compiled once per dialect; executing the compiled text on the driver's cursor
skips the per-call ORM/Core overhead that would otherwise dominate the hot path.

Every foreign exception is wrapped as `StoreUnavailableError` at this edge.
"""

from __future__ import annotations

import asyncio
import builtins
import functools
import json
import logging
import operator
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from falhook.receiver.errors import StoreUnavailableError
from falhook.receiver.models import BodyRow, DeliveryRow, State, StoredDelivery
from falhook.receiver.store.migrations import upgrade
from falhook.receiver.store.writer import Connection, LoopWriter, Op, ThreadWriter, Writer, brief

__all__ = ["Claim", "ClaimBatch", "NewDelivery", "Store", "make_engine"]

log = logging.getLogger("falhook.store")
TABLE: sa.Table = DeliveryRow.__table__  # type: ignore[attr-defined]
BODIES: sa.Table = BodyRow.__table__  # type: ignore[attr-defined]
NOTIFY_CHANNEL = "falhook_deliveries"
# What operators read: a delivery's state row with its body.
# Outer: a delivery whose body row is missing (a damaged store) still shows, body empty.
_WITH_BODY = sa.select(TABLE, BODIES.c.body).outerjoin(BODIES, BODIES.c.id == TABLE.c.id)
# Bodies deleted per statement by prune: well under SQLite's bound-parameter limit.
_PRUNE_CHUNK = 500
_ACTIVE = (State.PENDING.value, State.RUNNING.value)
# The active-state predicate, spelled with literals exactly as the partial index
# ix_falhook_deliveries_active_due (migration 2) states it: a planner can only match a
# partial index whose predicate the query implies, and a bound parameter implies nothing.
ACTIVE_PREDICATE = "state = 'pending' OR state = 'running'"


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


@dataclass(frozen=True, slots=True)
class ClaimBatch:
    claims: list[Claim]
    next_due_at: float | None  # earliest due_at of any pending or running delivery left


# libpq options for every PostgreSQL connection (the pool's and the listener's): a bounded
# connect, and TCP keepalives so a peer that vanished without a FIN/RST (a dead host, a cut
# network path) is noticed in ~20 s instead of the kernel's two hours.
PG_CONNECT_ARGS: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 3,
    "keepalives_count": 3,
}


def make_engine(url: str) -> sa.Engine:
    """An engine configured for durability: WAL + synchronous=FULL on SQLite."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError as exc:
        raise StoreUnavailableError(f"invalid database URL: {exc}") from exc
    if parsed.get_backend_name() == "sqlite":
        engine = sa.create_engine(parsed, connect_args={"timeout": 30, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            # WAL lets readers run beside the writer; synchronous=FULL fsyncs the WAL on
            # every commit, so an acknowledged delivery survives a power loss, not just a crash.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    return sa.create_engine(
        parsed,
        pool_pre_ping=True,  # detect connections killed by a restart or pg_terminate_backend
        pool_size=4,
        max_overflow=4,
        pool_timeout=5,
        connect_args=PG_CONNECT_ARGS,
    )


class _Compiled:
    """One compiled statement with positional placeholders, and how to fill them.

    Positional, because binding a tuple is cheaper than a dict: sqlite3 looks up each
    named parameter by a new string per execution (~1.2 us per statement, measured).
    """

    __slots__ = ("_args", "constants", "sql")

    def __init__(self, sql: str, order: Sequence[str], constants: dict[str, Any]) -> None:
        self.sql = sql
        self.constants = constants  # values fixed in the statement (states, increments)
        getter = operator.itemgetter(*order) if order else (lambda _: ())
        # itemgetter of one name returns the value itself, not a 1-tuple.
        self._args: Callable[[dict[str, Any]], Any] = (
            (lambda p: (getter(p),)) if len(order) == 1 else getter
        )

    def args(self, params: dict[str, Any] | None = None) -> tuple[Any, ...]:
        """The positional parameters for `params` (by name) plus the constants."""
        args: tuple[Any, ...] = self._args(
            {**self.constants, **params} if params else self.constants
        )
        return args

    def execute(self, cursor: Any, params: dict[str, Any] | None = None) -> None:
        cursor.execute(self.sql, self.args(params))


class _Sql:
    """Core statements against DeliveryRow, compiled once for one dialect."""

    def __init__(self, dialect: sa.Dialect) -> None:
        self.name = dialect.name
        # Positional placeholders for both drivers: "?" for sqlite3, "%s" for psycopg.
        if self.name == "sqlite":
            compile_dialect: sa.Dialect = sqlite_dialect.dialect(paramstyle="qmark")
            insert_fn: Any = sqlite_dialect.insert
        else:
            driver: Any = type(dialect)  # the engine's own driver, positional ("%s")
            compile_dialect = driver(paramstyle="format")
            insert_fn = pg_dialect.insert
        t = TABLE
        c = t.c

        def text(stmt: sa.ClauseElement) -> _Compiled:
            compiled = stmt.compile(dialect=compile_dialect)
            # Constants in the statement (states, increments) became bound parameters with
            # values; keep those values so each execution only supplies its own.
            constants = {
                name: bind.value
                for bind, name in compiled.bind_names.items()  # type: ignore[attr-defined]
                if not bind.required
            }
            order = compiled.positiontup or []  # type: ignore[attr-defined]
            return _Compiled(str(compiled), order, constants)

        bp = sa.bindparam
        # Literal SQL rather than IN (…) with parameters: an "expanding" IN cannot be compiled
        # ahead of time, and the partial index on due_at needs the literal predicate.
        active = sa.text(f"({ACTIVE_PREDICATE})")
        # Set by an operation that made a delivery due now (a new insert, a revived dead
        # one): only such a transaction NOTIFYs the other replicas. A NOTIFY on every
        # transaction (claims included) would make idle replicas wake each other forever.
        self.due_now = False
        self.claimed: list[Claim] = []
        row: dict[str, Any] = {
            name: bp(name)
            for name in (
                "request_id",
                "gateway_request_id",
                "status",
                "error",
                "payload_error",
                "user_id",
                "received_at",
            )
        }
        row["updated_at"] = bp("received_at")
        b = BODIES
        # Spelled out: SQLite's compiler writes RETURNING columns unqualified, which would
        # turn a Core correlation into "id = id" (true for every body).
        body_of = (
            sa.select(b.c.body)
            .where(sa.text("falhook_bodies.id = falhook_deliveries.id"))
            .scalar_subquery()
        )

        def with_body(insert: Any) -> _Compiled:
            # A new delivery's state row, then its body under the same id. PostgreSQL does
            # both in one statement (one round trip): the body is inserted only for a row
            # the first insert returned, so a duplicate inserts nothing. SQLite has no DML
            # in a WITH; there the op follows with `insert_body` and the cursor's lastrowid.
            insert = insert.on_conflict_do_nothing(index_elements=["request_id"])
            if self.name != "postgresql":
                return text(insert)
            added = insert.returning(c.id).cte("added")
            body = sa.bindparam("body", type_=sa.LargeBinary)
            return text(sa.insert(b).from_select(["id", "body"], sa.select(added.c.id, body)))

        self.insert = with_body(
            insert_fn(t).values(
                **row, state=State.PENDING.value, attempts=0, due_at=bp("received_at")
            )
        )
        # The same, already claimed by the inserting process: it dispatches at once after
        # the commit, without a separate claim. A crash before that leaves a lease to expire.
        self.insert_claimed = with_body(
            insert_fn(t).values(
                **row,
                state=State.RUNNING.value,
                attempts=1,
                claim_id=bp("claim_id"),
                due_at=bp("lease_until"),
            )
        )
        self.insert_body = (
            None
            if self.name == "postgresql"
            else text(sa.insert(b).values(id=bp("id"), body=bp("body")))
        )
        # A duplicate of a dead delivery re-arms it: a duplicate must never hide a failure.
        self.revive_dead = text(
            sa.update(t)
            .where(c.request_id == bp("request_id"), c.state == State.DEAD.value)
            .values(
                state=State.PENDING.value,
                attempts=0,
                due_at=bp("now"),
                updated_at=bp("now"),
                finished_at=None,
                claim_id=None,
            )
        )
        due = (
            sa.select(c.id)
            .where(active, c.due_at <= bp("now"))
            .order_by(c.due_at)
            .limit(bp("limit"))
        )
        if self.name == "postgresql":
            due = due.with_for_update(skip_locked=True)
        self.claim = text(
            sa.update(t)
            .where(c.id.in_(due.scalar_subquery()))
            .values(
                state=State.RUNNING.value,
                claim_id=bp("claim_id"),
                due_at=bp("lease_until"),
                attempts=c.attempts + 1,
                updated_at=bp("now"),
            )
            .returning(
                c.request_id,
                c.attempts,
                c.status,
                body_of,
                c.user_id,
                c.received_at,
                c.completed_callbacks,
            )
        )
        self.next_due = text(sa.select(sa.func.min(c.due_at)).where(active))
        mine = (
            c.request_id == bp("request_id"),
            c.claim_id == bp("claim"),
            c.state == State.RUNNING.value,
        )
        self.renew = text(
            sa.update(t).where(*mine).values(due_at=bp("lease_until"), updated_at=bp("now"))
        )
        # What every outcome writes: the claim is released, progress and time recorded.
        released: dict[str, Any] = {
            "claim_id": None,
            "completed_callbacks": bp("completed_callbacks"),
            "updated_at": bp("now"),
        }
        self.finish = text(
            sa.update(t)
            .where(*mine)
            .values(state=State.DONE.value, last_error=None, finished_at=bp("now"), **released)
        )
        self.reschedule = text(
            sa.update(t)
            .where(*mine)
            .values(
                state=State.PENDING.value,
                due_at=bp("due_at"),
                last_error=bp("last_error"),
                **released,
            )
        )
        self.bury = text(
            sa.update(t)
            .where(*mine)
            .values(
                state=State.DEAD.value,
                last_error=bp("last_error"),
                finished_at=bp("now"),
                **released,
            )
        )
        self.notify = f"NOTIFY {NOTIFY_CHANNEL}" if self.name == "postgresql" else None

    def add(self, cur: Any, insert: _Compiled, params: dict[str, Any]) -> bool:
        """Insert a new delivery and its body; False (nothing written) for a duplicate."""
        insert.execute(cur, params)
        if cur.rowcount != 1:
            return False
        if self.insert_body is not None:
            self.insert_body.execute(cur, {"id": cur.lastrowid, "body": params["body"]})
        return True


# --- operations: run on the writer's cursor, inside its batch transaction --------------


def _op_insert(
    new: NewDelivery, claim_id: str | None, lease_seconds: float, parsed: dict[str, Any] | None
) -> Op:
    params = {
        "request_id": new.request_id,
        "gateway_request_id": new.gateway_request_id,
        "status": new.status,
        "error": new.error,
        "payload_error": new.payload_error,
        "user_id": new.user_id,
        "body": new.body,
        "received_at": new.received_at,
    }
    if claim_id is not None:
        params["claim_id"] = claim_id
        params["lease_until"] = new.received_at + lease_seconds

    def op(cur: Any, sql: _Sql) -> bool:
        if claim_id is None:
            if sql.add(cur, sql.insert, params):
                sql.due_now = True
                return True
        else:
            if sql.add(cur, sql.insert_claimed, params):
                sql.claimed.append(
                    Claim(
                        request_id=new.request_id,
                        claim_id=claim_id,
                        attempt=1,
                        status=new.status,
                        body=new.body,
                        user_id=new.user_id,
                        received_at=new.received_at,
                        completed_callbacks=(),
                        parsed=parsed,
                    )
                )
                return True
        sql.revive_dead.execute(cur, {"request_id": new.request_id, "now": time.time()})
        if cur.rowcount == 1:
            sql.due_now = True
        return False

    return op


@functools.lru_cache(maxsize=256)
def _encode_sorted(names: tuple[str, ...]) -> str:
    # The same few callback sets recur for every delivery: encode each once.
    return json.dumps(list(names))


def _encode_callbacks(names: Iterable[str]) -> str | None:
    unique = tuple(sorted(set(names)))
    return _encode_sorted(unique) if unique else None


def _decode_callbacks(value: str | None) -> tuple[str, ...]:
    return tuple(json.loads(value)) if value else ()


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
        on_committed_insert: Callable[[], None] | None = None,
        on_claimed: Callable[[list[Claim]], None] | None = None,
    ) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        self._sql = _Sql(self.engine.dialect)
        self._max_batch = max_batch
        self._on_committed_insert = on_committed_insert
        self._on_claimed = on_claimed
        self._writer: Writer | None = None
        self._migrated = False
        self._migrate_lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------------------

    def migrate(self) -> int:
        """Create or upgrade the schema; idempotent and safe across processes."""
        with self._migrate_lock:
            try:
                version = upgrade(self.engine)
            except sa.exc.SQLAlchemyError as exc:
                raise StoreUnavailableError(f"cannot migrate the store: {brief(exc)}") from exc
            self._migrated = True
            return version

    def start(self) -> None:
        """Start the writer; the async methods may then be awaited on the calling loop."""
        if self._writer is not None:
            return
        strategy = LoopWriter if self.dialect == "sqlite" else ThreadWriter
        self._writer = strategy(
            Connection(self.engine, self._ensure_schema),
            self._sql,
            on_commit=self._committed,
            max_batch=self._max_batch,
        )
        self._writer.start()

    def _committed(self, due: bool, claimed: list[Any]) -> None:
        # Claims first: the dispatcher must own them before it looks for other due work.
        if claimed and self._on_claimed is not None:
            self._on_claimed(claimed)
        if due and self._on_committed_insert is not None:
            self._on_committed_insert()

    def _ensure_schema(self) -> None:
        if not self._migrated:
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

    async def insert(
        self,
        new: NewDelivery,
        *,
        claim_id: str | None = None,
        lease_seconds: float = 60.0,
        parsed: dict[str, Any] | None = None,
    ) -> bool:
        """Store a delivery durably. True if new, False if its request_id was already stored.

        With `claim_id`, a new delivery is stored already claimed (running, attempt 1,
        leased for `lease_seconds`) and handed to `on_claimed` right after the commit.
        """
        result: bool = await self._submit(_op_insert(new, claim_id, lease_seconds, parsed))
        return result

    async def claim(self, limit: int, lease_seconds: float) -> ClaimBatch:
        """Claim up to `limit` due deliveries (pending, or running with an expired lease)."""
        claim_id = uuid.uuid4().hex

        def op(cur: Any, sql: _Sql) -> ClaimBatch:
            now = time.time()
            sql.claim.execute(
                cur,
                {
                    "now": now,
                    "limit": limit,
                    "claim_id": claim_id,
                    "lease_until": now + lease_seconds,
                },
            )
            claims = [
                Claim(
                    request_id=r[0],
                    claim_id=claim_id,
                    attempt=r[1],
                    status=r[2],
                    # No body row would be a damaged store: an empty body then fails as
                    # "stored body unreadable" and is retried, not a crashed claim batch.
                    body=bytes(r[3]) if r[3] is not None else b"",
                    user_id=r[4],
                    received_at=r[5],
                    completed_callbacks=_decode_callbacks(r[6]),
                )
                for r in cur.fetchall()
            ]
            sql.next_due.execute(cur)
            row = cur.fetchone()
            return ClaimBatch(claims, row[0] if row else None)

        result: ClaimBatch = await self._submit(op)
        return result

    async def _fenced(self, statement: str, params: dict[str, Any]) -> bool:
        def op(cur: Any, sql: _Sql) -> bool:
            getattr(sql, statement).execute(cur, {**params, "now": time.time()})
            return bool(cur.rowcount == 1)

        result: bool = await self._submit(op)
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

    async def finish(self, claim: Claim, completed: Iterable[str] = ()) -> bool:
        """Mark done. False if the claim was lost, in which case nothing changed."""
        return await self._fenced(
            "finish",
            {
                "request_id": claim.request_id,
                "claim": claim.claim_id,
                "completed_callbacks": _encode_callbacks(completed),
            },
        )

    async def reschedule(
        self, claim: Claim, due_at: float, error: str, completed: Iterable[str] = ()
    ) -> bool:
        """Put back to pending for another attempt at `due_at`, keeping the error."""
        return await self._fenced(
            "reschedule",
            {
                "request_id": claim.request_id,
                "claim": claim.claim_id,
                "due_at": due_at,
                "last_error": error,
                "completed_callbacks": _encode_callbacks(completed),
            },
        )

    async def bury(self, claim: Claim, error: str, completed: Iterable[str] = ()) -> bool:
        """Mark dead (out of attempts), keeping the last error; `replay` revives it."""
        return await self._fenced(
            "bury",
            {
                "request_id": claim.request_id,
                "claim": claim.claim_id,
                "last_error": error,
                "completed_callbacks": _encode_callbacks(completed),
            },
        )

    async def ping(self) -> None:
        """Round-trip through the writer: raises StoreUnavailableError if it cannot."""

        def op(cur: Any, sql: _Sql) -> None:
            cur.execute("SELECT 1")
            cur.fetchall()

        await self._submit(op)

    # -- sync API (CLI, tests, health) -------------------------------------------------

    def _connect(self) -> sa.Connection:
        if not self._migrated:
            self.migrate()
        try:
            return self.engine.connect()
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailableError(f"cannot connect: {brief(exc)}") from exc

    def get(self, request_id: str) -> StoredDelivery | None:
        """One stored delivery, or None."""
        rows = self._select(_WITH_BODY.where(TABLE.c.request_id == request_id))
        return rows[0] if rows else None

    def list(
        self,
        *,
        states: Sequence[State] = (),
        since: float | None = None,
        limit: int | None = 100,
    ) -> builtins.list[StoredDelivery]:
        """Stored deliveries, newest first, filtered by state and received time."""
        stmt = _WITH_BODY.order_by(TABLE.c.received_at.desc(), TABLE.c.request_id)
        if states:
            stmt = stmt.where(TABLE.c.state.in_([s.value for s in states]))
        if since is not None:
            stmt = stmt.where(TABLE.c.received_at >= since)
        if limit is not None:
            stmt = stmt.limit(limit)
        return self._select(stmt)

    def counts(self) -> dict[State, int]:
        """Number of deliveries in each state (every state present, zero if none)."""
        stmt = sa.select(TABLE.c.state, sa.func.count()).group_by(TABLE.c.state)
        result = dict.fromkeys(State, 0)
        for state, count in self._execute(stmt):
            result[State(state)] = int(count)
        return result

    def oldest_pending_age(self, now: float | None = None) -> float:
        """Seconds since the oldest not-yet-finished delivery was received (0 if none)."""
        stmt = sa.select(sa.func.min(TABLE.c.received_at)).where(TABLE.c.state.in_(_ACTIVE))
        rows = self._execute(stmt)
        oldest = rows[0][0] if rows else None
        return 0.0 if oldest is None else max(0.0, (now or time.time()) - float(oldest))

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
        finished = [State.DONE.value, State.DEAD.value]
        select = sa.select(TABLE.c.request_id, TABLE.c.state).where(TABLE.c.state.in_(finished))
        if request_ids:
            select = select.where(TABLE.c.request_id.in_(list(request_ids)))
        if states:
            select = select.where(TABLE.c.state.in_([s.value for s in states]))
        if since is not None:
            select = select.where(TABLE.c.received_at >= since)
        now = time.time()
        try:
            with self._connect() as conn, conn.begin():
                previous = {rid: State(state) for rid, state in conn.execute(select)}
                if previous:
                    conn.execute(
                        sa.update(TABLE)
                        .where(
                            TABLE.c.request_id.in_(list(previous)),
                            TABLE.c.state.in_(finished),
                        )
                        .values(
                            state=State.PENDING.value,
                            attempts=0,
                            due_at=now,
                            claim_id=None,
                            completed_callbacks=None,
                            finished_at=None,
                            updated_at=now,
                        )
                    )
                    if self._sql.notify is not None:
                        conn.exec_driver_sql(self._sql.notify)
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailableError(brief(exc)) from exc
        return previous

    def prune(self, older_than: float, *, states: Sequence[State] = (State.DONE,)) -> int:
        """Delete finished deliveries that finished more than `older_than` seconds ago.

        Never deletes pending or running deliveries, whatever `states` says.
        """
        allowed = [s.value for s in states if s in (State.DONE, State.DEAD)]
        if not allowed:
            return 0
        cutoff = time.time() - older_than
        # The state rows go first and say which bodies go with them: a delivery that
        # changed state meanwhile (a replay) is not deleted, so neither is its body.
        stmt = (
            sa.delete(TABLE)
            .where(TABLE.c.state.in_(allowed), TABLE.c.finished_at < cutoff)
            .returning(TABLE.c.id)
        )
        try:
            with self._connect() as conn, conn.begin():
                ids = [row[0] for row in conn.execute(stmt)]
                for start in range(0, len(ids), _PRUNE_CHUNK):
                    chunk = ids[start : start + _PRUNE_CHUNK]
                    conn.execute(sa.delete(BODIES).where(BODIES.c.id.in_(chunk)))
                return len(ids)
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailableError(brief(exc)) from exc

    def _execute(self, stmt: sa.Executable) -> builtins.list[Any]:
        try:
            with self._connect() as conn:
                return list(conn.execute(stmt))
        except sa.exc.SQLAlchemyError as exc:
            raise StoreUnavailableError(brief(exc)) from exc

    def _select(self, stmt: sa.Select[Any]) -> builtins.list[StoredDelivery]:
        return [
            StoredDelivery(
                request_id=r.request_id,
                gateway_request_id=r.gateway_request_id,
                status=r.status,
                error=r.error,
                payload_error=r.payload_error,
                user_id=r.user_id,
                body=bytes(r.body) if r.body is not None else b"",
                received_at=r.received_at,
                state=State(r.state),
                attempts=r.attempts,
                due_at=r.due_at,
                claim_id=r.claim_id,
                last_error=r.last_error,
                completed_callbacks=_decode_callbacks(r.completed_callbacks),
                updated_at=r.updated_at,
                finished_at=r.finished_at,
            )
            for r in self._execute(stmt)
        ]
