"""Callbacks that never return or block the event loop, through a real `falhook serve`:
they time out (a failed attempt: retried, then dead), stop holding dispatch slots, and
are named in the log and the metrics."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.conftest import SpawnServer
from tests.e2e.server import RECORD_CALLBACK, Sender, ServerProcess, wait_for

pytestmark = pytest.mark.slow

ASYNC_CALLBACK = "tests.e2e.callbacks:record_async"
LIMITS = {
    "FALHOOK_CALLBACK_TIMEOUT_SECONDS": "0.5",
    "FALHOOK_CALLBACK_BACKOFF_SECONDS": "0.05",
    "FALHOOK_CONCURRENCY": "2",
    "FALHOOK_LEASE_SECONDS": "3",
}


def _state(server: ServerProcess, request_id: str, state: str) -> dict[str, object]:
    def check() -> dict[str, object] | None:
        row = server.row(request_id)
        return row if row is not None and row["state"] == state else None

    try:
        return wait_for(check, timeout=15, what=f"{request_id} {state}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: row {server.row(request_id)}\n{server.log()}") from None


def _metric(client: httpx.Client, server: ServerProcess, name: str) -> float:
    text = client.get(server.url + "/metrics").text
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.mark.parametrize("callback", [RECORD_CALLBACK, ASYNC_CALLBACK], ids=["sync", "async"])
def test_a_callback_that_never_returns_times_out_and_frees_its_slot(
    spawn: SpawnServer, sender: Sender, client: httpx.Client, callback: str
) -> None:
    # A sync callback's thread cannot be cancelled: it is abandoned, and up to
    # FALHOOK_CONCURRENCY abandoned threads cost no dispatch slot. So with 2 slots, two
    # hanging sync attempts in all (an async one is cancelled: it may retry).
    attempts = 2 if callback == ASYNC_CALLBACK else 1
    env = {**LIMITS, "FALHOOK_CALLBACK_MAX_ATTEMPTS": str(attempts)}
    server = spawn(env=env, args=["--callback", callback])
    hang = {"test": "hang"} if callback == ASYNC_CALLBACK else {"test": "slow", "seconds": 3600}
    for i in range(2):  # both slots taken by callbacks that never return
        response = sender.post(client, server.webhook_url, f"hang-{i}", payload=hang)
        assert response.status_code == 200
    for i in range(2):
        row = _state(server, f"hang-{i}", "dead")  # each attempt timed out: a failure
        assert row["attempts"] == attempts
        assert "timed out" in str(row["last_error"])
    # The slots are free again: a normal delivery is dispatched.
    assert sender.post(client, server.webhook_url, "after-hang").status_code == 200
    _state(server, "after-hang", "done")
    server.wait_for_log("timed out after 0.5 s")
    assert _metric(client, server, "falhook_callback_timeouts_total") == 2 * attempts
    abandoned = _metric(client, server, "falhook_callback_threads_abandoned")
    assert abandoned == (2 if callback == RECORD_CALLBACK else 0)


def test_an_async_callback_blocking_the_loop_is_named(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    server = spawn(args=["--callback", ASYNC_CALLBACK])
    payload = {"test": "block_loop", "seconds": 2.5}
    assert sender.post(client, server.webhook_url, "blocker", payload=payload).status_code == 200
    wait_for(
        lambda: "event loop blocked" in server.log() and ASYNC_CALLBACK in server.log(),
        timeout=15,
        what="a loop-lag warning naming the callback",
    )
    assert _metric(client, server, "falhook_event_loop_blocked_total") >= 1


def _histogram(client: httpx.Client, server: ServerProcess, name: str) -> dict[str, float]:
    """A histogram's cumulative buckets by ``le``, with ``sum`` and ``count``."""
    text = client.get(server.url + "/metrics").text
    values = {
        le: float(value)
        for le, value in re.findall(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.MULTILINE)
    }
    for part in ("sum", "count"):
        match = re.search(rf"^{name}_{part} (\S+)$", text, re.MULTILINE)
        values[part] = float(match.group(1)) if match else 0.0
    return values


def test_ack_latency_counts_the_time_a_request_waited_for_a_blocked_loop(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    server = spawn(args=["--callback", ASYNC_CALLBACK])
    assert sender.post(client, server.webhook_url, "warm").status_code == 200
    server.wait_records(lambda records: any(r["request_id"] == "warm" for r in records))
    before = _histogram(client, server, "falhook_ack_latency_seconds")
    payload = {"test": "block_loop", "seconds": 3}
    assert sender.post(client, server.webhook_url, "blocker", payload=payload).status_code == 200
    server.wait_records(lambda records: any(r["request_id"] == "blocker" for r in records))

    # The loop now sleeps for 3 s: one delivery on the connection already open, one on a
    # new connection; their bytes wait in the kernel until the loop reads them.
    def post(request_id: str, fresh: bool) -> float:
        with httpx.Client(timeout=30) as new_client:
            began = time.monotonic()
            response = sender.post(new_client if fresh else client, server.webhook_url, request_id)
            assert response.status_code == 200, response.text
            return time.monotonic() - began

    with ThreadPoolExecutor(2) as pool:
        waits = list(pool.map(post, ["kept-alive", "new-connection"], [False, True]))
    assert min(waits) > 1.0, waits  # both were sent while the loop was blocked
    after = _histogram(client, server, "falhook_ack_latency_seconds")
    assert after["count"] - before["count"] == 3
    # The blocker was answered at once; the two others only once the loop woke, and that
    # wait is counted: both are over a second, and together within a few hundredths of
    # what the client measured (minus the 10 ms the kernel's clock cannot vouch for).
    assert after["1.0"] - before["1.0"] == 1, (before, after)
    counted = after["sum"] - before["sum"]
    assert counted > sum(waits) - 0.25, (counted, waits)
