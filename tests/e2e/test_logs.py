"""A real `falhook serve` at its default log level: one JSON line per accepted delivery and
per callback outcome, in order, and none lost when it is stopped with SIGTERM."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import SpawnServer
from tests.e2e.server import Sender
from tests.e2e.test_crash import GRACEFUL_EXIT

pytestmark = pytest.mark.slow


def _json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_sigterm_right_after_the_last_ack_loses_no_log_line(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    server = spawn()
    sent = [f"log-{i:03d}" for i in range(60)]
    for request_id in sent:
        assert sender.post(client, server.webhook_url, request_id).status_code == 200
    # A callback still running at SIGTERM: its outcome is logged during the shutdown itself,
    # moments before the process ends.
    slow = {"test": "slow", "seconds": 1}
    assert sender.post(client, server.webhook_url, "log-slow", payload=slow).status_code == 200
    sent.append("log-slow")
    server.wait_records(lambda rs: any(r["request_id"] == "log-slow" for r in rs))
    # At once: lines may still be queued for the writer thread.
    assert server.terminate() in GRACEFUL_EXIT, server.log()

    lines = _json_lines(server.log_path.read_text())
    accepted = [line["request_id"] for line in lines if line.get("outcome") == "accepted"]
    assert accepted == sent, server.log()  # all of them, in the order they were acknowledged
    done_lines = [line["request_id"] for line in lines if line.get("msg") == "callbacks done"]
    assert sorted(done_lines) == sorted(server.done_ids())  # one line per finished delivery
    assert len(done_lines) == len(set(done_lines))
    assert "log-slow" in done_lines, server.log()
    for line in lines:
        assert line["level"] and line["ts"].endswith("Z")
