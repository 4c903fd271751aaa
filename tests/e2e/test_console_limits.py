"""The console under abuse, with a real `falhook serve`: sign-in guessing through a trusted
proxy address with a new X-Forwarded-For each time is still locked out."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.conftest import SpawnServer
from tests.e2e.console import signin_attempt

pytestmark = pytest.mark.slow

TOKEN = "console-limits-token-90c1"


def test_rotating_x_forwarded_for_does_not_reset_the_lockout(spawn: SpawnServer) -> None:
    # 127.0.0.1 is a trusted proxy by default (FALHOOK_FORWARDED_ALLOW_IPS).
    server = spawn(env={"FALHOOK_CONSOLE_TOKEN": TOKEN})
    statuses = []
    with httpx.Client(timeout=30.0, follow_redirects=False) as client:
        for i in range(8):
            spoofed = {"x-forwarded-for": f"203.0.113.{i + 1}"}
            statuses.append(signin_attempt(client, server.url, "wrong", spoofed).status_code)
        # Locked out: the right token is refused too, from any claimed address.
        last = signin_attempt(client, server.url, TOKEN, {"x-forwarded-for": "198.51.100.7"})
    assert statuses == [401] * 5 + [429] * 3, statuses
    assert last.status_code == 429
    # The log names the address the client claimed and the connection it came over.
    server.wait_for_log("203.0.113.1 (via 127.0.0.1)")
