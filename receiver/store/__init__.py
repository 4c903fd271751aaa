"""The delivery store: tables, migrations, group-committing writers and the admin queries.

Modules: engine (connections), statements (the hot path's compiled SQL), operations (what
runs inside a writer's transaction), writer / loop_writer / thread_writer (group commit),
checkpointer (SQLite WAL), listener (PostgreSQL NOTIFY), admin (operator queries on a
SQLAlchemy connection), attempts, control, expectations (their queries, beside their
tables' concerns), migrations (the versioned schema), records (values passed to and from
the store), store (`Store`). The tables themselves are models.py's, below the store.

The names below are loaded on first use (PEP 562): the store commands import admin.py,
and need none of the writers.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from falhook.receiver.lazy import lazy_exports as _lazy_exports

if _TYPE_CHECKING:
    from falhook.receiver.store.engine import make_engine
    from falhook.receiver.store.records import Claim, ClaimBatch, NewDelivery
    from falhook.receiver.store.store import Store

# Public name -> the module that defines it.
_EXPORTS = {
    "Claim": "records",
    "ClaimBatch": "records",
    "NewDelivery": "records",
    "Store": "store",
    "make_engine": "engine",
}

__all__ = ["Claim", "ClaimBatch", "NewDelivery", "Store", "make_engine"]


__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals())
