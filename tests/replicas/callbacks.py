"""Callbacks for the replica tests: each call is recorded durably, in SQL.

``record`` INSERTs ``(request_id, replica, at)`` into ``callback_log`` in the test's
PostgreSQL database, on a connection of its own (autocommit, one per callback thread), so
the tests state their invariants as queries — never from logs. A failed INSERT (the
connection was killed) raises, so the dispatcher retries the delivery: a callback counts
only once it is in the log.

Environment: FALHOOK_TEST_LOG_DSN (libpq conninfo), FALHOOK_TEST_REPLICA (a name),
FALHOOK_TEST_CALLBACK_SECONDS (sleep before recording: a slow callback).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import psycopg

from falhook.receiver.models import Delivery

CREATE_LOG = """
CREATE TABLE IF NOT EXISTS callback_log (
    id bigserial PRIMARY KEY,
    request_id text NOT NULL,
    replica text NOT NULL,
    attempt int NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp()
)
"""

_local = threading.local()


def _connection() -> Any:
    conn = getattr(_local, "conn", None)
    if conn is None or conn.closed:
        conn = psycopg.connect(os.environ["FALHOOK_TEST_LOG_DSN"], autocommit=True)
        _local.conn = conn
    return conn


def record(delivery: Delivery) -> None:
    """Sleep (if asked), then log this call; raise if it could not be logged."""
    seconds = float(os.environ.get("FALHOOK_TEST_CALLBACK_SECONDS", "0") or 0)
    if seconds:
        time.sleep(seconds)
    try:
        _connection().execute(
            "INSERT INTO callback_log (request_id, replica, attempt) VALUES (%s, %s, %s)",
            (delivery.request_id, os.environ.get("FALHOOK_TEST_REPLICA", "?"), delivery.attempt),
        )
    except psycopg.Error:
        conn, _local.conn = getattr(_local, "conn", None), None
        if conn is not None:
            conn.close()
        raise
