"""What a real `falhook serve` logs — when it starts and stops, rejects, retries — and what
it starts despite."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

import falhook
from tests.e2e.conftest import SpawnServer
from tests.e2e.server import USER_ID, Sender, ServerProcess, free_port, wait_for

pytestmark = pytest.mark.slow
GRACEFUL_EXIT = (0, -signal.SIGTERM)  # uvicorn re-raises the SIGTERM it handled


def log_lines(server: ServerProcess) -> list[dict[str, Any]]:
    """The server's JSON log lines so far (the harness's "=== start" marks, and a line still
    being written, are skipped)."""
    lines = []
    for line in server.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def wait_log(server: ServerProcess, msg: str, timeout: float = 20.0) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next((line for line in log_lines(server) if msg in line["msg"]), None)

    try:
        return wait_for(find, timeout=timeout, what=f"log line {msg!r}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{server.log()}") from None


def test_a_jwks_url_that_is_down_is_a_warning_not_a_refusal(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    down = f"http://127.0.0.1:{free_port()}/jwks.json"
    server = spawn(jwks=down)
    warning = wait_log(server, "keys unavailable at start")
    assert warning["level"] == "warning" and down in warning["msg"]
    response = sender.post(client, server.webhook_url, "req-keys-down")
    assert response.status_code == 503 and response.json()["error"] == "keys_unavailable"


def test_the_startup_line_says_what_runs_where(spawn: SpawnServer) -> None:
    server = spawn(args=["--callback", "tests.e2e.callbacks:record", "--concurrency", "7"])
    line = wait_log(server, "started")
    assert line["version"] == falhook.__version__
    assert line["listen"] == server.url
    assert line["store"] == f"sqlite:///{server.db_path}"
    assert line["jwks"].startswith("http://127.0.0.1:")
    assert line["user_id"] == USER_ID
    assert line["callbacks"] == ["tests.e2e.callbacks:record"]
    assert line["forward_to"] is None and line["concurrency"] == 7
    assert not any("FALHOOK_USER_ID is not set" in x["msg"] for x in log_lines(server))


def test_no_pinned_user_id_is_a_warning(spawn: SpawnServer, tmp_path: Path) -> None:
    server = spawn(env={"FALHOOK_USER_ID": ""}, args=["--forward-to", "http://127.0.0.1:9/in"])
    started = wait_log(server, "started")
    assert started["user_id"] is None and started["forward_to"] == "http://127.0.0.1:9/in"
    assert "forwarding to http://127.0.0.1:9/in" in started["msg"]
    assert wait_log(server, "FALHOOK_USER_ID is not set")["level"] == "warning"


@pytest.mark.parametrize(
    ("callback", "payload", "finished", "cancelled"),
    [
        # A slow callback in flight at SIGTERM finishes within the shutdown timeout...
        ("tests.e2e.callbacks:record", {"test": "slow", "seconds": 1.0}, 1, 0),
        # ...one that never returns is cancelled at the timeout (its lease brings it back).
        ("tests.e2e.callbacks:record_async", {"test": "hang"}, 0, 1),
    ],
)
def test_the_shutdown_line_says_what_was_drained(
    spawn: SpawnServer,
    sender: Sender,
    client: httpx.Client,
    callback: str,
    payload: dict[str, Any],
    finished: int,
    cancelled: int,
) -> None:
    server = spawn(args=["--callback", callback, "--shutdown-timeout-seconds", "1"])
    assert sender.post(client, server.webhook_url, "req-drain", payload=payload).status_code == 200
    server.wait_records(lambda records: any(r["phase"] == "start" for r in records))
    assert server.terminate() in GRACEFUL_EXIT
    line = wait_log(server, "falhook stopped")
    assert (line["finished"], line["cancelled"]) == (finished, cancelled)


def test_a_rejection_line_names_the_client_and_the_missing_header(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    server = spawn()
    body, headers = sender.signed("req-unsigned")
    del headers["X-Fal-Webhook-Signature"]
    # From loopback, which uvicorn trusts by default (--forwarded-allow-ips 127.0.0.1):
    # the client is the address the proxy says it forwarded for.
    headers["x-forwarded-for"] = "203.0.113.9"
    assert client.post(server.webhook_url, content=body, headers=headers).status_code == 401
    line = wait_log(server, "delivery rejected")
    assert line["reason"] == "missing_header"
    assert "x-fal-webhook-signature" in line["detail"].lower()
    assert line["client"] == "203.0.113.9"
    assert line["request_id"] == "req-unsigned"


def test_forwarded_for_is_ignored_from_an_untrusted_proxy(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    server = spawn(args=["--forwarded-allow-ips", "192.0.2.1"])
    body, headers = sender.signed("req-untrusted")
    headers["X-Fal-Webhook-Signature"] = "ab" * 64
    headers["x-forwarded-for"] = "203.0.113.9"
    assert client.post(server.webhook_url, content=body, headers=headers).status_code == 401
    line = wait_log(server, "delivery rejected")
    assert line["reason"] == "invalid_signature" and line["client"] == "127.0.0.1"


def test_a_retry_line_says_when_the_next_attempt_is_due(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    server = spawn(
        env={"FALHOOK_CALLBACK_BACKOFF_SECONDS": "30", "FALHOOK_CALLBACK_MAX_ATTEMPTS": "3"}
    )
    sent = sender.post(client, server.webhook_url, "req-retry", payload={"test": "fail_always"})
    assert sent.status_code == 200
    line = wait_log(server, "callbacks retry")
    assert line["level"] == "warning" and line["attempt"] == 1
    assert "RuntimeError: callback failed on attempt 1" in line["error"]
    assert line["next_attempt_at"] in line["msg"]
    # Backoff 30 s, jittered: due in the future, within the policy's bounds.
    assert 0 < line["retry_in_seconds"] <= 60
