"""What operators read and change: the store's sync API, in plain SQL on a DBAPI cursor.

`Admin` runs each call in a transaction of its own, on a connection from its connector:
straight from the driver for the store commands (`Admin.open`: no SQLAlchemy, so they
start fast), or from the engine's pool inside `falhook serve` (`Store.admin`: the console,
the metrics gauges, the pruner). The queries are written once, below, for both.
None of this is on the hot path.
"""

from __future__ import annotations

import builtins
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from falhook.receiver.errors import StoreUnavailableError
from falhook.receiver.state import State
from falhook.receiver.store import attempts
from falhook.receiver.store.attempts import StoredAttempt, list_attempts
from falhook.receiver.store.control import DispatchControl, read_control, write_control
from falhook.receiver.store.dbapi import (
    NOTIFY_CHANNEL,
    Connector,
    Db,
    DirectConnector,
    Op,
    Tx,
    brief,
    placeholders,
)
from falhook.receiver.store.records import StoredDelivery, decode_callbacks
from falhook.receiver.store.schema import check_version, schema_version

__all__ = [
    "PRUNE_LOCK_KEY",
    "Admin",
    "connector_for",
    "counts",
    "get",
    "list_deliveries",
    "oldest_pending_age",
    "prune",
    "prune_batch",
    "replay",
]

_T = TypeVar("_T")

# A StoredDelivery's fields as the deliveries table holds them (its body is joined on).
_COLUMNS = tuple(f.name for f in dataclasses.fields(StoredDelivery) if f.name != "body")
# A delivery's state row with its body. Outer: a delivery whose body row is missing (a
# damaged store) still shows, body empty.
_WITH_BODY = (
    "SELECT "
    + ", ".join(f"d.{name}" for name in _COLUMNS)
    + ", b.body FROM falhook_deliveries d LEFT OUTER JOIN falhook_bodies b ON b.id = d.id"
)
# Ids per statement (bodies deleted by prune, deliveries re-queued by replay): well under
# SQLite's bound-parameter limit.
_CHUNK = 500
_ACTIVE = f"state IN ('{State.PENDING.value}', '{State.RUNNING.value}')"
_FINISHED = f"state IN ('{State.DONE.value}', '{State.DEAD.value}')"
_FINISHED_VALUES = (State.DONE.value, State.DEAD.value)


def get(db: Db, request_id: str) -> StoredDelivery | None:
    """One stored delivery, or None."""
    rows = _deliveries(db, f"{_WITH_BODY} WHERE d.request_id = ?", [request_id])
    return rows[0] if rows else None


def list_deliveries(
    db: Db,
    *,
    states: Sequence[State] = (),
    since: float | None = None,
    limit: int | None = 100,
) -> list[StoredDelivery]:
    """Stored deliveries, newest first, filtered by state and received time."""
    where: list[str] = []
    params: list[Any] = []
    if states:
        where.append(f"d.state IN ({placeholders(len(states))})")
        params += [s.value for s in states]
    if since is not None:
        where.append("d.received_at >= ?")
        params.append(since)
    text = _WITH_BODY + (" WHERE " + " AND ".join(where) if where else "")
    text += " ORDER BY d.received_at DESC, d.request_id"
    if limit is not None:
        text += " LIMIT ?"
        params.append(limit)
    return _deliveries(db, text, params)


def counts(db: Db) -> dict[State, int]:
    """Number of deliveries in each state (every state present, zero if none)."""
    result = dict.fromkeys(State, 0)
    for state, count in db.execute(
        "SELECT state, COUNT(*) FROM falhook_deliveries GROUP BY state"
    ).fetchall():
        result[State(state)] = int(count)
    return result


def oldest_pending_age(db: Db, now: float | None = None) -> float:
    """Seconds since the oldest not-yet-finished delivery was received (0 if none)."""
    row = db.execute(f"SELECT MIN(received_at) FROM falhook_deliveries WHERE {_ACTIVE}").fetchone()
    oldest = row[0] if row else None
    return 0.0 if oldest is None else max(0.0, (now or time.time()) - float(oldest))


def replay(
    db: Db,
    request_ids: Sequence[str] = (),
    *,
    states: Sequence[State] = (),
    since: float | None = None,
) -> dict[str, State]:
    """Re-queue finished deliveries for dispatch now; return each one's previous state."""
    where = [_FINISHED]
    params: list[Any] = []
    if request_ids:
        where.append(f"request_id IN ({placeholders(len(request_ids))})")
        params += request_ids
    if states:
        where.append(f"state IN ({placeholders(len(states))})")
        params += [s.value for s in states]
    if since is not None:
        where.append("received_at >= ?")
        params.append(since)
    select = "SELECT request_id, state FROM falhook_deliveries WHERE " + " AND ".join(where)
    previous = {rid: State(state) for rid, state in db.execute(select, params).fetchall()}
    now = time.time()
    ids = list(previous)
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        # The state is checked again: a delivery that changed meanwhile is left alone.
        db.execute(
            f"UPDATE falhook_deliveries SET state = '{State.PENDING.value}', attempts = 0, "
            "due_at = ?, claim_id = NULL, completed_callbacks = NULL, finished_at = NULL, "
            f"updated_at = ? WHERE request_id IN ({placeholders(len(chunk))}) AND {_FINISHED}",
            [now, now, *chunk],
        )
    if previous and db.dialect == "postgresql":
        db.execute(f"NOTIFY {NOTIFY_CHANNEL}")  # dispatchers on every replica, at once
    return previous


def prune(db: Db, older_than: float, *, states: Sequence[State] = (State.DONE,)) -> int:
    """Delete finished deliveries that finished more than `older_than` seconds ago."""
    allowed = [s.value for s in states if s.value in _FINISHED_VALUES]
    if not allowed:
        return 0
    cutoff = time.time() - older_than
    # The state rows go first and say which bodies go with them: a delivery that changed
    # state meanwhile (a replay) is not deleted, so neither is its body.
    rows = db.execute(
        f"DELETE FROM falhook_deliveries WHERE state IN ({placeholders(len(allowed))}) "
        "AND finished_at < ? RETURNING id",
        [*allowed, cutoff],
    ).fetchall()
    ids = [row[0] for row in rows]
    for start in range(0, len(ids), _CHUNK):
        _delete_rest(db, ids[start : start + _CHUNK])
    return len(ids)


# Serialises retention pruning across replicas on PostgreSQL (any constant of our own).
PRUNE_LOCK_KEY = 0x66616C70  # "falp"


def prune_batch(db: Db, older_than: float, limit: int) -> int | None:
    """Delete up to `limit` done deliveries finished more than `older_than` seconds ago,
    in the caller's transaction; the same rules as `prune` (done only). None when another
    replica is pruning now (PostgreSQL: one at a time)."""
    if db.dialect == "postgresql":
        taken = db.execute("SELECT pg_try_advisory_xact_lock(?)", [PRUNE_LOCK_KEY]).fetchone()
        if not taken[0]:
            return None
    done = f"state = '{State.DONE.value}'"
    rows = db.execute(
        "DELETE FROM falhook_deliveries WHERE id IN (SELECT id FROM falhook_deliveries "
        f"WHERE {done} AND finished_at < ? LIMIT ?) AND {done} RETURNING id",
        [time.time() - older_than, limit],
    ).fetchall()
    ids = [row[0] for row in rows]
    if ids:
        _delete_rest(db, ids)
    return len(ids)


def _delete_rest(db: Db, delivery_ids: Sequence[int]) -> None:
    """The bodies and attempts of deleted deliveries (at most _CHUNK ids)."""
    db.execute(
        f"DELETE FROM falhook_bodies WHERE id IN ({placeholders(len(delivery_ids))})",
        delivery_ids,
    )
    attempts.delete_for(db, delivery_ids)


def _deliveries(db: Db, text: str, params: Sequence[Any]) -> list[StoredDelivery]:
    found = []
    for row in db.execute(text, params).fetchall():
        values = dict(zip(_COLUMNS, row, strict=False))
        body = row[len(_COLUMNS)]
        values["body"] = bytes(body) if body is not None else b""
        values["state"] = State(values["state"])
        values["completed_callbacks"] = decode_callbacks(values["completed_callbacks"])
        found.append(StoredDelivery(**values))
    return found


# -- the sync API ------------------------------------------------------------------------


def connector_for(url: str) -> Connector:
    """Straight from the driver when the URL allows (see DirectConnector.for_url), else
    through SQLAlchemy — for the store commands, which never migrate."""
    direct = DirectConnector.for_url(url)
    if direct is not None:
        return direct
    from falhook.receiver.store.engine import EngineConnector, make_engine

    return EngineConnector(make_engine(url), owns_engine=True)


class Admin:
    """The store's sync API: each call a transaction of its own, on a connection from
    `connector`. Driver errors become StoreUnavailableError (one line)."""

    def __init__(self, connector: Connector) -> None:
        self._connector = connector
        self.dialect = connector.dialect
        self._schema_ready = False

    @classmethod
    def open(cls, url: str) -> Admin:
        """For the store commands: `url`'s store, opened without migrating (`close` it)."""
        return cls(connector_for(url))

    def close(self) -> None:
        """Close the connections this Admin opened."""
        self._connector.close()

    # -- running ---------------------------------------------------------------------

    def _prepare(self) -> None:
        """Before each query (not the schema check): Store migrates here."""

    def _query(self, query: Callable[..., _T], *args: Any, write: bool, **kwargs: Any) -> _T:
        self._prepare()
        return self._run(query, *args, write=write, **kwargs)

    def _guard_files(self) -> None:
        """Before each write: Store refuses one its SQLite files cannot take (fileguard)."""

    def _run(self, query: Callable[..., _T], *args: Any, write: bool, **kwargs: Any) -> _T:
        if write:
            self._guard_files()
        connector = self._connector
        conn = connector.connect()
        try:
            cur = conn.cursor()
            result = query(Db(cur, self.dialect), *args, **kwargs)
            cur.close()
            if write:
                conn.commit()
            else:
                conn.rollback()  # ends the read's snapshot (PostgreSQL: its transaction)
        except connector.errors as exc:
            connector.discard(conn)
            raise StoreUnavailableError(brief(exc)) from exc
        except BaseException:
            connector.discard(conn)
            raise
        connector.release(conn)
        return result

    def run_sync(self, op: Op) -> Any:
        """Run one store operation (a function of a `Tx`, e.g. expectations.py's) in a
        transaction of its own, committed."""
        if not self._schema_ready:
            # Only `falhook serve` creates or upgrades the schema; elsewhere it must be there.
            self.check_schema()
        return self._run(lambda db: op(Tx(db.cur, None)), write=True)

    async def run(self, op: Op) -> Any:
        """`run_sync` in a thread, for async callers."""
        import asyncio  # only async callers need it (the CLI is sync)

        return await asyncio.to_thread(self.run_sync, op)

    # -- the schema ------------------------------------------------------------------

    def check_schema(self) -> int:
        """Check, changing nothing, that the schema is the one this falhook writes:
        StoreSchemaError when there is none, or an older or newer one."""
        version = self._run(schema_version, write=False)
        check_version(version)
        self._schema_ready = True
        return version

    @property
    def schema_ready(self) -> bool:
        """The schema is known to be current (checked here, or migrated by the caller)."""
        return self._schema_ready

    def mark_schema_ready(self) -> None:
        """The owner migrated the schema (Store.migrate)."""
        self._schema_ready = True

    # -- queries ---------------------------------------------------------------------

    def get(self, request_id: str) -> StoredDelivery | None:
        """One stored delivery, or None."""
        return self._query(get, request_id, write=False)

    def attempts(self, request_id: str) -> builtins.list[StoredAttempt]:
        """A delivery's dispatch attempts, oldest first (empty if none, or no delivery)."""
        return self._query(list_attempts, request_id, write=False)

    def list(
        self,
        *,
        states: Sequence[State] = (),
        since: float | None = None,
        limit: int | None = 100,
    ) -> builtins.list[StoredDelivery]:
        """Stored deliveries, newest first, filtered by state and received time."""
        return self._query(list_deliveries, states=states, since=since, limit=limit, write=False)

    def counts(self) -> dict[State, int]:
        """Number of deliveries in each state (every state present, zero if none)."""
        return self._query(counts, write=False)

    def oldest_pending_age(self, now: float | None = None) -> float:
        """Seconds since the oldest not-yet-finished delivery was received (0 if none)."""
        return self._query(oldest_pending_age, now, write=False)

    def dispatch_control(self) -> DispatchControl:
        """The store-wide dispatch switch as it is now (paused or not, and why)."""
        return self._query(read_control, write=False)

    def set_dispatch_paused(
        self, paused: bool, *, reason: str | None = None, by: str | None = None
    ) -> DispatchControl:
        """Pause or resume dispatch for every replica on this store; return the new state."""
        return self._query(write_control, paused=paused, reason=reason, by=by, write=True)

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
        return self._query(replay, request_ids, states=states, since=since, write=True)

    def prune(self, older_than: float, *, states: Sequence[State] = (State.DONE,)) -> int:
        """Delete finished deliveries that finished more than `older_than` seconds ago.

        Never deletes pending or running deliveries, whatever `states` says.
        """
        return self._query(prune, older_than, states=states, write=True)

    def prune_batch(self, older_than: float, limit: int) -> int | None:
        """One small transaction of retention pruning (done only, as `prune`); None when
        another replica is pruning (PostgreSQL)."""
        return self._query(prune_batch, older_than, limit, write=True)
