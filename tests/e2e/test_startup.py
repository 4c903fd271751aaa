"""What a real `falhook serve` says when it starts and stops, and what it starts despite."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import SpawnServer
from tests.e2e.server import Sender, ServerProcess, free_port, wait_for

pytestmark = pytest.mark.slow


def log_lines(server: ServerProcess) -> list[dict[str, Any]]:
    """The server's JSON log lines so far (uvicorn's own plain lines are skipped)."""
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
