"""The delivery store: tables, migrations, group-committing writers and the admin queries.

Modules: engine (connections), statements (the hot path's compiled SQL), operations (what
runs inside a writer's transaction), writer / loop_writer / thread_writer (group commit),
checkpointer (SQLite WAL), listener (PostgreSQL NOTIFY), admin (operator queries),
migrations (the schema), records (values passed to and from the store), store (`Store`).
"""

from falhook.receiver.store.engine import make_engine
from falhook.receiver.store.records import Claim, ClaimBatch, NewDelivery
from falhook.receiver.store.store import Store

__all__ = ["Claim", "ClaimBatch", "NewDelivery", "Store", "make_engine"]
