"""Callbacks through a real `falhook serve`: fields, dedupe under concurrency, fast acks
while a callback is slow, retries, dead deliveries and their re-arming."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import SpawnServer
from tests.e2e.server import Sender, ServerProcess, wait_for

pytestmark = pytest.mark.slow

BIG = 2**53 + 12345  # a float would round it


def _done(server: ServerProcess, request_id: str, timeout: float = 20.0) -> dict[str, Any]:
    records = server.wait_records(
        lambda rs: any(r["request_id"] == request_id and r["phase"] == "done" for r in rs),
        timeout=timeout,
    )
    return next(r for r in records if r["request_id"] == request_id and r["phase"] == "done")


def _state(
    server: ServerProcess, request_id: str, state: str, timeout: float = 20.0
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        row = server.row(request_id)
        return row if row is not None and row["state"] == state else None

    try:
        return wait_for(check, timeout=timeout, what=f"{request_id} {state}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: row {server.row(request_id)}\n{server.log()}") from None


def test_ok_error_and_payload_error_reach_the_callback(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    server = spawn()
    payload = {"images": [{"url": "https://x/y.png"}], "seed": BIG}
    sent: dict[str, dict[str, Any]] = {
        "cb-ok": {"payload": payload, "gateway_request_id": "gw-ok"},
        "cb-error": {
            "status": "ERROR",
            "payload": {"detail": [{"msg": "bad prompt"}]},
            "error": "Invalid status code: 422",
            "gateway_request_id": "gw-error",
        },
        "cb-payload-error": {
            "payload": None,
            "payload_error": "Response payload is not JSON serializable",
            "gateway_request_id": "gw-pe",
        },
    }
    before = time.time()
    for request_id, fields in sent.items():
        response = sender.post(client, server.webhook_url, request_id, **fields)
        assert response.json() == {"request_id": request_id, "duplicate": False}

    ok = _done(server, "cb-ok")
    assert ok["status"] == "OK"
    assert ok["gateway_request_id"] == "gw-ok"
    assert ok["payload"] == payload
    assert ok["payload"]["seed"] == BIG and isinstance(ok["payload"]["seed"], int)
    assert ok["error"] is None and ok["payload_error"] is None
    assert ok["attempt"] == 1
    received_at = datetime.fromisoformat(ok["received_at"])
    assert received_at.tzinfo is not None
    assert before - 1 <= received_at.timestamp() <= time.time()

    error = _done(server, "cb-error")
    assert error["status"] == "ERROR"
    assert error["error"] == "Invalid status code: 422"
    assert error["payload"] == {"detail": [{"msg": "bad prompt"}]}
    assert error["gateway_request_id"] == "gw-error"

    payload_error = _done(server, "cb-payload-error")
    assert payload_error["status"] == "OK"
    assert payload_error["payload"] is None
    assert payload_error["payload_error"] == "Response payload is not JSON serializable"

    for request_id in sent:
        row = _state(server, request_id, "done")
        assert row["attempts"] == 1
        assert row["last_error"] is None


def test_ten_concurrent_copies_run_the_callback_once(spawn: SpawnServer, sender: Sender) -> None:
    server = spawn()
    body, headers = sender.signed("cb-concurrent")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30.0) as ac:
            return await asyncio.gather(
                *(ac.post(server.webhook_url, content=body, headers=headers) for _ in range(10))
            )

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 10
    duplicates = [r.json()["duplicate"] for r in responses]
    assert duplicates.count(False) == 1, duplicates
    assert all(r.json()["request_id"] == "cb-concurrent" for r in responses)

    _state(server, "cb-concurrent", "done")
    # Nothing else is pending, and the single delivery is done: no second run can follow.
    runs = [r for r in server.records() if r["request_id"] == "cb-concurrent"]
    assert len(runs) == 1, runs


def test_acks_stay_fast_while_a_callback_is_slow(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    server = spawn()
    response = sender.post(
        client, server.webhook_url, "cb-slow", payload={"test": "slow", "seconds": 3}
    )
    assert response.status_code == 200
    server.wait_records(lambda rs: any(r["request_id"] == "cb-slow" for r in rs))

    latencies = []
    for i in range(50):
        body, headers = sender.signed(f"cb-fast-{i}")
        started = time.perf_counter()
        response = client.post(server.webhook_url, content=body, headers=headers)
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200
    measured_until = time.time()

    records = server.wait_records(
        lambda rs: any(r["request_id"] == "cb-slow" and r["phase"] == "done" for r in rs),
        timeout=30,
    )
    slow_done = next(r for r in records if r["request_id"] == "cb-slow" and r["phase"] == "done")
    # Every ack was measured while the slow callback was still running.
    assert slow_done["t"] > measured_until
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1]
    assert p99 < 1.0, latencies
    assert max(latencies) < 2.0, latencies
    # ... and the fast deliveries' callbacks did not queue behind the slow one either.
    fast_done = {r["request_id"]: r["t"] for r in records if r["request_id"].startswith("cb-fast")}
    assert any(t < slow_done["t"] for t in fast_done.values())


def test_failing_callback_is_retried_to_success(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    server = spawn(env={"FALHOOK_CALLBACK_BACKOFF_SECONDS": "0.05"})
    response = sender.post(
        client, server.webhook_url, "cb-retry", payload={"test": "fail_until", "succeed_on": 3}
    )
    assert response.status_code == 200
    done = _done(server, "cb-retry")
    assert done["attempt"] == 3
    attempts = [r["attempt"] for r in server.records() if r["request_id"] == "cb-retry"]
    assert attempts == [1, 2, 3]
    row = _state(server, "cb-retry", "done")
    assert row["attempts"] == 3
    assert row["last_error"] is None


def test_callback_retried_until_dead_then_a_duplicate_rearms_it(
    spawn: SpawnServer, sender: Sender, client: httpx.Client, tmp_path: Path
) -> None:
    server = spawn(
        env={"FALHOOK_CALLBACK_BACKOFF_SECONDS": "0.05", "FALHOOK_CALLBACK_MAX_ATTEMPTS": "3"}
    )
    heal = tmp_path / "heal"
    fields: dict[str, Any] = {"payload": {"test": "fail_unless_file", "path": str(heal)}}
    response = sender.post(client, server.webhook_url, "cb-dead", **fields)
    assert response.json() == {"request_id": "cb-dead", "duplicate": False}

    row = _state(server, "cb-dead", "dead")
    assert row["attempts"] == 3
    assert "does not exist" in row["last_error"]
    assert "RuntimeError" in row["last_error"]
    assert row["finished_at"] is not None
    fails = [r["attempt"] for r in server.records() if r["request_id"] == "cb-dead"]
    assert fails == [1, 2, 3]

    # fal retries the delivery: it is a duplicate, but it must not hide the failure.
    heal.touch()
    again = sender.post(client, server.webhook_url, "cb-dead", **fields)
    assert again.json() == {"request_id": "cb-dead", "duplicate": True}
    done = _done(server, "cb-dead")
    assert done["attempt"] == 1  # re-armed with fresh attempts
    row = _state(server, "cb-dead", "done")
    assert row["last_error"] is None


def test_duplicate_of_a_done_delivery_does_not_rerun(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    server = spawn()
    sender.post(client, server.webhook_url, "cb-once")
    _state(server, "cb-once", "done")
    again = sender.post(client, server.webhook_url, "cb-once")
    assert again.json() == {"request_id": "cb-once", "duplicate": True}
    # A later delivery's callback has run, so the dispatcher had every chance to rerun it.
    sender.post(client, server.webhook_url, "cb-once-after")
    _done(server, "cb-once-after")
    assert [r["request_id"] for r in server.records()].count("cb-once") == 1
