"""Sidecar mode: `falhook serve --forward-to URL` POSTs each verified, deduplicated body
verbatim to the user's app, retrying until it answers 2xx."""

from __future__ import annotations

import base64
import http.server
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from tests.e2e.conftest import SpawnServer
from tests.e2e.server import USER_ID, Sender, wait_for

pytestmark = pytest.mark.slow


class UserApp:
    """A loopback app that fails the first `failures` POSTs with a 500, then accepts."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.received: list[tuple[bytes, dict[str, str], int]] = []
        self._lock = threading.Lock()
        app = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with app._lock:
                    status = 500 if len(app.received) < app.failures else 200
                    app.received.append((body, headers, status))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/fal-results"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


@pytest.fixture
def user_app() -> Iterator[UserApp]:
    app = UserApp(failures=2)
    try:
        yield app
    finally:
        app.stop()


def test_forward_to_posts_the_raw_body_and_retries_non_2xx(
    spawn: SpawnServer, sender: Sender, client: httpx.Client, user_app: UserApp
) -> None:
    server = spawn(
        args=["--forward-to", user_app.url],
        env={"FALHOOK_CALLBACK_BACKOFF_SECONDS": "0.05"},
    )
    # Odd spacing, key order and a big integer: only a byte-for-byte copy keeps them.
    body = (
        b'{"status":"OK",  "request_id": "side-1", "payload": {"seed": 17454220438242315174},'
        b' "gateway_request_id": "gw-side", "error": null}'
    )
    signed, headers = sender.signed("side-1", body=body)
    response = client.post(server.webhook_url, content=signed, headers=headers)
    assert response.json() == {"request_id": "side-1", "duplicate": False}

    wait_for(lambda: len(user_app.received) >= 3, timeout=20, what="3 forwards")
    wait_for(
        lambda: (server.row("side-1") or {}).get("state") == "done",
        timeout=20,
        what="side-1 done",
    )
    assert [status for _, _, status in user_app.received] == [500, 500, 200]
    for attempt, (forwarded, fwd_headers, _) in enumerate(user_app.received, start=1):
        assert forwarded == body
        assert fwd_headers["x-falhook-request-id"] == "side-1"
        assert fwd_headers["x-falhook-attempt"] == str(attempt)
        assert fwd_headers["content-type"] == "application/json"
    row = server.row("side-1")
    assert row is not None and row["attempts"] == 3


def test_signed_forwards_verify_with_the_standardwebhooks_library(
    spawn: SpawnServer, sender: Sender, client: httpx.Client, user_app: UserApp
) -> None:
    """The app behind falhook checks each forward with `standardwebhooks` itself."""
    secret = "whsec_" + base64.b64encode(b"k" * 24).decode()
    server = spawn(
        args=["--forward-to", user_app.url],
        env={"FALHOOK_CALLBACK_BACKOFF_SECONDS": "0.05", "FALHOOK_FORWARD_SECRET": secret},
    )
    body = b'{"status":"OK", "request_id": "side-s", "payload": {"seed": 17454220438242315174}}'
    signed, headers = sender.signed("side-s", body=body)
    assert client.post(server.webhook_url, content=signed, headers=headers).status_code == 200
    wait_for(lambda: len(user_app.received) >= 3, timeout=20, what="3 forwards")
    verifier = Webhook(secret)
    for forwarded, fwd_headers, _ in user_app.received:
        assert forwarded == body
        assert verifier.verify(forwarded, fwd_headers) == json.loads(body)
        assert fwd_headers["webhook-id"] == "side-s"  # the same on every retry
        assert fwd_headers["x-fal-webhook-request-id"] == "side-s"
        assert fwd_headers["x-fal-webhook-user-id"] == USER_ID
        # fal's signed timestamp, passed on as fal sent it (not the forward's own time).
        assert fwd_headers["x-fal-webhook-timestamp"] == headers["X-Fal-Webhook-Timestamp"]
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"x" * 24).decode()).verify(
            user_app.received[0][0], user_app.received[0][1]
        )
