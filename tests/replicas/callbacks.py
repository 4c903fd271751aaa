"""Callbacks for the replica tests: each call is recorded durably, in SQL.

``record`` INSERTs ``(request_id, replica, at)`` into ``callback_log`` in the test's
PostgreSQL database, so the tests state their invariants as queries — never from logs. A
failed INSERT (the connection was killed) raises, so the dispatcher retries the delivery: a
callback counts only once it is in the log.

The connections (autocommit) are a few per process, borrowed for the INSERT: one per
callback thread would be up to FALHOOK_CONCURRENCY (64) per replica, and three replicas
would take more than the server's 100 — leaving none for the replicas' own stores.

Environment: FALHOOK_TEST_LOG_DSN (libpq conninfo), FALHOOK_TEST_REPLICA (a name),
FALHOOK_TEST_CALLBACK_SECONDS (sleep before recording: a slow callback).
"""

from __future__ import annotations

import os
import queue
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

_CONNECTIONS = 4  # per process
_idle: queue.LifoQueue[Any] = queue.LifoQueue()
_slots = threading.BoundedSemaphore(_CONNECTIONS)


def _insert(request_id: str, attempt: int) -> None:
    with _slots:
        try:
            conn = _idle.get_nowait()
        except queue.Empty:
            conn = None
        try:
            if conn is None or conn.closed:
                conn = psycopg.connect(os.environ["FALHOOK_TEST_LOG_DSN"], autocommit=True)
            conn.execute(
                "INSERT INTO callback_log (request_id, replica, attempt) VALUES (%s, %s, %s)",
                (request_id, os.environ.get("FALHOOK_TEST_REPLICA", "?"), attempt),
            )
        except psycopg.Error:
            if conn is not None:
                conn.close()
            raise
        _idle.put(conn)


def record(delivery: Delivery) -> None:
    """Sleep (if asked), then log this call; raise if it could not be logged."""
    seconds = float(os.environ.get("FALHOOK_TEST_CALLBACK_SECONDS", "0") or 0)
    if seconds:
        time.sleep(seconds)
    _insert(delivery.request_id, delivery.attempt)
