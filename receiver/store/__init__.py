"""The delivery store: tables, migrations, group-committing writers and the admin queries."""

from falhook.receiver.store.store import Claim, ClaimBatch, NewDelivery, Store, make_engine

__all__ = ["Claim", "ClaimBatch", "NewDelivery", "Store", "make_engine"]
