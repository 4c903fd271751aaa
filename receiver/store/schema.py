"""Which schema a store has, read in plain SQL: the store commands check it, changing
nothing (only `falhook serve` migrates: migrations.py)."""

from __future__ import annotations

from falhook.receiver.errors import StoreSchemaError
from falhook.receiver.store.dbapi import Db

__all__ = ["SCHEMA_VERSION", "VERSION_TABLE", "check_version", "schema_version"]

# The version this falhook writes: the last of migrations.MIGRATIONS (a test holds the two
# together). A constant, so checking a store does not import the migrations (SQLAlchemy).
SCHEMA_VERSION = 9
VERSION_TABLE = "falhook_schema_version"

_HAS_TABLE = {
    "sqlite": f"SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '{VERSION_TABLE}'",
    # Visible on the search_path, as SQLAlchemy's has_table sees it.
    "postgresql": f"SELECT 1 WHERE to_regclass('{VERSION_TABLE}') IS NOT NULL",
}


def schema_version(db: Db) -> int:
    """The highest applied migration, 0 for a database without falhook's tables."""
    if db.execute(_HAS_TABLE[db.dialect]).fetchone() is None:
        return 0
    row = db.execute(f"SELECT COALESCE(MAX(version), 0) FROM {VERSION_TABLE}").fetchone()
    return int(row[0])


def check_version(version: int) -> None:
    """StoreSchemaError unless `version` is the one this falhook writes, saying what to do."""
    if version == 0:
        raise StoreSchemaError(
            "no falhook tables in this database (`falhook serve` creates them when it "
            "starts): is --database-url / FALHOOK_DATABASE_URL the right one?"
        )
    if version < SCHEMA_VERSION:
        raise StoreSchemaError(
            f"the store's schema is version {version}, this falhook needs {SCHEMA_VERSION}: "
            "start this version's `falhook serve` once (it upgrades the schema), then retry"
        )
    if version > SCHEMA_VERSION:
        raise StoreSchemaError(
            f"the store's schema is version {version}, newer than this falhook knows "
            f"({SCHEMA_VERSION}): upgrade falhook"
        )
