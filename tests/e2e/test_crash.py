"""Crashes and restarts: nothing acknowledged is lost, dedupe survives, a callback cut
off by a crash runs again once its lease expires, and SIGTERM lets a callback finish."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest

from tests.e2e.conftest import SpawnServer
from tests.e2e.server import Sender, ServerProcess, wait_for

pytestmark = pytest.mark.slow

LEASE = {"FALHOOK_LEASE_SECONDS": "1"}
# uvicorn re-raises SIGTERM once its graceful shutdown is complete.
GRACEFUL_EXIT = (0, -signal.SIGTERM)


def _send_burst_and_kill(server: ServerProcess, sender: Sender, count: int) -> set[str]:
    """POST `count` deliveries concurrently; SIGKILL the server once half are acked."""
    signed = [sender.signed(f"burst-{i:03d}") for i in range(count)]
    acked: set[str] = set()

    async def post(ac: httpx.AsyncClient, body: bytes, headers: dict[str, str]) -> None:
        try:
            response = await ac.post(server.webhook_url, content=body, headers=headers)
        except httpx.TransportError:
            return  # the server died before answering: not acknowledged, fal would retry
        if response.status_code == 200:
            acked.add(response.json()["request_id"])
            if len(acked) == count // 2:
                os.kill(server.pid, signal.SIGKILL)

    async def burst() -> None:
        limits = httpx.Limits(max_connections=50)
        async with httpx.AsyncClient(timeout=30.0, limits=limits) as ac:
            await asyncio.gather(*(post(ac, body, headers) for body, headers in signed))

    asyncio.run(burst())
    assert server.proc is not None
    server.proc.wait(timeout=30)
    return acked


def test_sigkill_during_a_burst_loses_no_acknowledged_delivery(
    spawn: SpawnServer, sender: Sender
) -> None:
    server = spawn(env=LEASE)
    acked = _send_burst_and_kill(server, sender, 200)
    assert server.proc is not None and server.proc.returncode == -signal.SIGKILL
    assert len(acked) >= 100

    server.restart()
    server.wait_records(lambda rs: acked <= {r["request_id"] for r in rs}, timeout=60)

    def all_done() -> bool:
        return all((server.row(rid) or {}).get("state") == "done" for rid in sorted(acked)[:5])

    wait_for(all_done, timeout=20, what="acked deliveries done")


def test_dedupe_survives_a_restart(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    server = spawn()
    first = sender.post(client, server.webhook_url, "restart-dedupe")
    assert first.json() == {"request_id": "restart-dedupe", "duplicate": False}
    server.wait_records(lambda rs: any(r["request_id"] == "restart-dedupe" for r in rs))
    assert server.terminate() in GRACEFUL_EXIT

    server.restart()
    again = sender.post(client, server.webhook_url, "restart-dedupe")
    assert again.json() == {"request_id": "restart-dedupe", "duplicate": True}
    # A fresh delivery's callback runs after the restart; the old one was not re-run.
    sender.post(client, server.webhook_url, "restart-fresh")
    server.wait_records(lambda rs: any(r["request_id"] == "restart-fresh" for r in rs))
    runs = [r for r in server.records() if r["request_id"] == "restart-dedupe"]
    assert len(runs) == 1, runs


def test_crash_during_a_callback_reruns_it_after_the_lease(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    server = spawn(env=LEASE)
    response = sender.post(
        client,
        server.webhook_url,
        "crash-mid-callback",
        payload={"test": "hang_first", "seconds": 600},
    )
    assert response.status_code == 200
    server.wait_records(lambda rs: any(r["phase"] == "start" for r in rs))
    first_pid = server.pid
    server.kill()
    row = server.row("crash-mid-callback")
    assert row is not None and row["state"] == "running"

    server.restart()
    records = server.wait_records(lambda rs: any(r["phase"] == "done" for r in rs), timeout=30)
    done = next(r for r in records if r["phase"] == "done")
    assert done["attempt"] == 2
    assert done["pid"] != first_pid
    wait_for(
        lambda: (server.row("crash-mid-callback") or {}).get("state") == "done",
        timeout=20,
        what="done after the retake",
    )


def test_sigterm_lets_a_running_callback_finish(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    server = spawn()
    response = sender.post(
        client, server.webhook_url, "graceful", payload={"test": "slow", "seconds": 1.5}
    )
    assert response.status_code == 200
    server.wait_records(lambda rs: any(r["phase"] == "start" for r in rs))
    assert server.terminate(timeout=30) in GRACEFUL_EXIT
    phases = [r["phase"] for r in server.records() if r["request_id"] == "graceful"]
    assert phases == ["start", "done"]
    row = server.row("graceful")
    assert row is not None
    assert row["state"] == "done"
    assert row["attempts"] == 1
