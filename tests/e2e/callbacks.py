"""Callbacks for the end-to-end tests, named on `falhook serve --callback` as
``tests.e2e.callbacks:record``.

Each call appends one JSON line to the file named by ``FALHOOK_TEST_RECORD`` with a single
``write`` on an ``O_APPEND`` descriptor followed by ``fsync``: a SIGKILL of the server
loses no record that was written. What the callback does is chosen by the delivery's
payload (``{"test": <mode>, ...}``); a payload without ``test`` is simply recorded.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from falhook.receiver import Delivery

RECORD_ENV = "FALHOOK_TEST_RECORD"


def append_record(event: dict[str, Any]) -> None:
    """Append one JSON line durably (atomic append, then fsync)."""
    line = (json.dumps(event) + "\n").encode()
    fd = os.open(os.environ[RECORD_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _event(delivery: Delivery, phase: str) -> dict[str, Any]:
    return {
        "phase": phase,
        "request_id": delivery.request_id,
        "gateway_request_id": delivery.gateway_request_id,
        "status": delivery.status,
        "payload": delivery.payload,
        "error": delivery.error,
        "payload_error": delivery.payload_error,
        "received_at": delivery.received_at.isoformat(),
        "attempt": delivery.attempt,
        "source": delivery.source,
        "media": [
            {
                "pointer": m.pointer,
                "state": str(m.state),
                "stored_url": m.stored_url,
                "sha256": m.sha256,
                "size": m.size,
            }
            for m in delivery.media
        ],
        "pid": os.getpid(),
        "t": time.time(),
    }


def record(delivery: Delivery) -> None:
    """Record the delivery; the payload's ``test`` key may ask for a slow or failing run.

    Modes: ``slow`` (sleep ``seconds``), ``fail_always``, ``fail_until`` (fail before
    attempt ``succeed_on``), ``fail_unless_file`` (fail while ``path`` does not exist),
    ``hang_first`` (attempt 1 blocks for ``seconds``; later attempts succeed).
    Phases recorded: ``start`` (slow/hanging runs), ``fail`` and ``done``.
    """
    payload = delivery.payload if isinstance(delivery.payload, dict) else {}
    mode = payload.get("test")
    if mode == "fail_always":
        append_record(_event(delivery, "fail"))
        raise RuntimeError(f"callback failed on attempt {delivery.attempt}")
    if mode == "fail_until" and delivery.attempt < int(payload["succeed_on"]):
        append_record(_event(delivery, "fail"))
        raise RuntimeError(f"not yet (attempt {delivery.attempt})")
    if mode == "fail_unless_file" and not os.path.exists(payload["path"]):
        append_record(_event(delivery, "fail"))
        raise RuntimeError(f"{payload['path']} does not exist")
    if mode == "slow" or (mode == "hang_first" and delivery.attempt == 1):
        append_record(_event(delivery, "start"))
        time.sleep(float(payload["seconds"]))  # the workload itself: a slow callback
    append_record(_event(delivery, "done"))


async def record_async(delivery: Delivery) -> None:
    """`record` as an ``async def``, with two modes of its own: ``hang`` (await forever:
    cancellable) and ``block_loop`` (a blocking ``time.sleep`` of ``seconds`` on the loop,
    the classic mistake)."""
    payload = delivery.payload if isinstance(delivery.payload, dict) else {}
    mode = payload.get("test")
    if mode == "hang":
        append_record(_event(delivery, "start"))
        await asyncio.Event().wait()
    if mode == "block_loop":
        append_record(_event(delivery, "start"))
        time.sleep(float(payload["seconds"]))  # noqa: ASYNC251 — blocks the loop on purpose
        append_record(_event(delivery, "done"))
        return
    record(delivery)
