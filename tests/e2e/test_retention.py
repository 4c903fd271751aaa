"""`falhook serve` prunes finished deliveries past FALHOOK_RETENTION by itself, by the
same rules as `falhook prune` (done only)."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.conftest import SpawnServer
from tests.e2e.server import Sender, wait_for

pytestmark = pytest.mark.slow


def test_serve_prunes_done_deliveries_past_the_retention(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    server = spawn(env={"FALHOOK_RETENTION": "1s", "FALHOOK_CALLBACK_MAX_ATTEMPTS": "1"})
    assert sender.post(client, server.webhook_url, "kept-briefly").status_code == 200
    failing = {"payload": {"test": "fail_always"}}
    assert sender.post(client, server.webhook_url, "dead-kept", **failing).status_code == 200
    wait_for(
        lambda: (row := server.row("dead-kept")) is not None and row["state"] == "dead",
        timeout=15,
        what="dead-kept dead",
    )
    wait_for(
        lambda: server.row("kept-briefly") is None,
        timeout=15,
        what=f"kept-briefly pruned\n{server.log()}",
    )
    assert server.row("dead-kept") is not None  # dead deliveries are for operators to see
    server.wait_for_log("pruned")
