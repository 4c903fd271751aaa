"""PostgreSQL for the ``falhook-pg`` targets: is it there, and a fresh database per run.

The admin URL (``BENCH_PG_URL``, a SQLAlchemy ``postgresql+psycopg://`` URL to a database
that exists, normally ``postgres``) is only used to probe the server and to CREATE and DROP
the run's own uniquely named databases; the servers under test get a URL to that database.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

ADMIN_URL_ENV = "BENCH_PG_URL"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
PROBE_TIMEOUT_S = 2
DATABASE_PREFIX = "falhook_bench_"


def admin_url(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get(ADMIN_URL_ENV) or DEFAULT_ADMIN_URL


def libpq_dsn(url: str) -> str:
    """``postgresql+psycopg://u@h:5432/db`` → ``postgresql://u@h:5432/db`` for psycopg."""
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def with_database(url: str, database: str) -> str:
    """The same server and credentials, another database (kept as a SQLAlchemy URL)."""
    return sa.make_url(url).set(database=database).render_as_string(hide_password=False)


def redacted(url: str) -> str:
    """For the report: the URL without its password."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparsable URL>"


def new_database_name() -> str:
    # Lowercase letters, digits and underscores: a plain identifier, unique per run.
    return f"{DATABASE_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"


@dataclass(frozen=True)
class PgProbe:
    available: bool
    admin_url: str
    reason: str = ""
    server_version: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "status": "ok" if self.available else "unavailable",
            "admin_url": redacted(self.admin_url),
        }
        if self.reason:
            out["reason"] = self.reason
        if self.server_version:
            out["server_version"] = self.server_version
        return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def probe(url: str | None = None, timeout_s: int = PROBE_TIMEOUT_S) -> PgProbe:
    """Connect to the admin database once; never raises (the reason says what went wrong)."""
    url = admin_url() if url is None else url
    try:
        import psycopg  # the postgres extra
    except ImportError as exc:
        return PgProbe(False, url, f"psycopg is not installed ({exc})")
    try:
        dsn = libpq_dsn(url)
    except Exception as exc:
        return PgProbe(False, url, f"bad {ADMIN_URL_ENV}: {_first_line(exc)}")
    try:
        with psycopg.connect(dsn, connect_timeout=max(1, timeout_s), autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
    except Exception as exc:
        return PgProbe(False, url, _first_line(exc))
    return PgProbe(True, url, server_version=str(row[0]) if row else "")


@contextmanager
def fresh_database(url: str) -> Iterator[str]:
    """CREATE a uniquely named database, yield its SQLAlchemy URL, DROP it (FORCE) after."""
    import psycopg
    from psycopg import sql

    name = new_database_name()
    dsn = libpq_dsn(url)
    with psycopg.connect(dsn, connect_timeout=PROBE_TIMEOUT_S * 5, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(url, name)
    finally:
        with psycopg.connect(dsn, connect_timeout=PROBE_TIMEOUT_S * 5, autocommit=True) as conn:
            # WITH (FORCE) (PostgreSQL 13+): a server that was SIGKILLed may leave sessions.
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
