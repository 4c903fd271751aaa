"""The console under abuse, with a real `falhook serve`: sign-in guessing through a trusted
proxy address with a new X-Forwarded-For each time is still locked out; a huge delivery's
page is bounded and made off the event loop, so acknowledgements never wait for it."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import SpawnServer
from tests.e2e.console import signed_in, signin_attempt
from tests.e2e.server import Sender

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


def _big_body(request_id: str) -> bytes:
    """A ~15 MB delivery full of URLs (the worst case for the page: every URL a link)."""
    urls = [f"https://v3.fal.media/files/{i:07d}/image-output.png" for i in range(300_000)]
    document = {"request_id": request_id, "status": "OK", "payload": {"urls": urls}}
    return json.dumps(document).encode()


def test_a_huge_delivery_page_never_holds_up_acknowledgements(
    spawn: SpawnServer, sender: Sender
) -> None:
    server = spawn(env={"FALHOOK_CONSOLE_TOKEN": TOKEN})
    body = _big_body("r-huge")
    assert len(body) > 14_000_000
    with httpx.Client(timeout=60.0) as client:
        signed, headers = sender.signed("r-huge", body=body)
        assert client.post(server.webhook_url, content=signed, headers=headers).status_code == 200
    console = signed_in(server.url, TOKEN)
    views: list[httpx.Response] = []
    done = threading.Event()

    def view() -> None:
        views.append(console.get(server.url + "/console/deliveries/r-huge"))

    slowest = 0.0
    acks = 0
    try:
        viewers = [threading.Thread(target=view) for _ in range(4)]
        for thread in viewers:
            thread.start()
        # Acknowledgements go on while the four pages are made.
        with httpx.Client(timeout=60.0) as client:
            while any(thread.is_alive() for thread in viewers) or acks < 5:
                began = time.perf_counter()
                response = sender.post(client, server.webhook_url, f"r-ack-{acks}")
                assert response.status_code == 200, response.text
                slowest = max(slowest, time.perf_counter() - began)
                acks += 1
        for thread in viewers:
            thread.join(60)
        done.set()
        raw = console.get(server.url + "/console/raw/r-huge")
    finally:
        console.close()
    assert [v.status_code for v in views] == [200] * 4
    page = views[0].text
    # A bounded page: the start of the body, and a link to all of it.
    assert len(page) < 3_000_000, len(page)
    assert "/console/raw/r-huge" in page
    assert raw.status_code == 200 and raw.content == body
    assert raw.headers["content-type"].startswith("text/plain")
    assert "sandbox" in raw.headers["content-security-policy"]
    assert slowest < 1.0, (slowest, acks)
