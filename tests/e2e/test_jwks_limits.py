"""A JWKS source that stalls, fails, bloats or rotates, behind a real `falhook serve`:
fetches have a total deadline and a size cap, are rate-limited on a cold cache too, and
"could not check" is a 503, never a 401."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from falhook.verify.testing import KeyPair, generate_keypair, jwks_document
from tests.e2e.conftest import SpawnServer
from tests.e2e.server import Sender

pytestmark = pytest.mark.slow


class HostileJWKS:
    """A loopback JWKS whose behaviour the test sets: ``ok``, ``fail``, ``drip``, ``huge``."""

    def __init__(self, keypair: KeyPair) -> None:
        self.mode = "ok"
        self.document = json.dumps(jwks_document(keypair)).encode()
        self.hits = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with outer.lock:
                    outer.hits += 1
                mode = outer.mode
                if mode == "fail":
                    self.send_response(500)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                body = outer.document
                if mode == "huge":
                    padding = b" " * (8 * 1024 * 1024)
                    body = body[:-1] + b', "pad": "' + padding + b'"}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                try:
                    if mode == "drip":
                        for byte in body:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(0.3)
                    else:
                        self.wfile.write(body)
                except OSError:
                    pass  # the client gave up: that is the point

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def set_keys(self, keypair: KeyPair) -> None:
        self.document = json.dumps(jwks_document(keypair)).encode()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hostile_jwks(fal_key: KeyPair) -> Iterator[HostileJWKS]:
    server = HostileJWKS(fal_key)
    try:
        yield server
    finally:
        server.close()


def test_a_dripping_jwks_is_given_up_on_within_the_deadline(
    spawn: SpawnServer, sender: Sender, client: httpx.Client, hostile_jwks: HostileJWKS
) -> None:
    hostile_jwks.mode = "drip"
    server = spawn(jwks=hostile_jwks.url, env={"FALHOOK_JWKS_TIMEOUT_SECONDS": "1"})
    started = time.monotonic()
    response = sender.post(client, server.webhook_url, "drip")
    took = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "keys_unavailable"
    assert took < 3, took


def test_readyz_answers_quickly_while_the_jwks_stalls(
    spawn: SpawnServer, client: httpx.Client, hostile_jwks: HostileJWKS
) -> None:
    hostile_jwks.mode = "drip"
    server = spawn(jwks=hostile_jwks.url)  # the default 5 s fetch deadline
    started = time.monotonic()
    response = client.get(server.url + "/readyz")
    took = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "keys_unavailable"
    assert took < 3, took


def test_a_failing_jwks_on_a_cold_cache_is_fetched_once_per_interval(
    spawn: SpawnServer, sender: Sender, hostile_jwks: HostileJWKS
) -> None:
    hostile_jwks.mode = "fail"
    server = spawn(jwks=hostile_jwks.url)

    def post(i: int) -> int:
        with httpx.Client(timeout=30) as c:
            return sender.post(c, server.webhook_url, f"cold-{i}").status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(post, range(40)))
    assert set(statuses) == {503}, statuses
    assert hostile_jwks.hits <= 2, hostile_jwks.hits  # not one fetch per request


def test_an_oversized_jwks_is_refused_without_stalling_the_server(
    spawn: SpawnServer, sender: Sender, client: httpx.Client, hostile_jwks: HostileJWKS
) -> None:
    hostile_jwks.mode = "huge"
    server = spawn(jwks=hostile_jwks.url)
    response = sender.post(client, server.webhook_url, "huge")
    assert response.status_code == 503, response.text
    assert "bytes" in response.json()["detail"]
    server.wait_for_log("JWKS")


def test_keys_rotated_within_the_refresh_interval_are_503_not_401(
    spawn: SpawnServer, sender: Sender, client: httpx.Client, hostile_jwks: HostileJWKS
) -> None:
    server = spawn(jwks=hostile_jwks.url)
    assert sender.post(client, server.webhook_url, "before-rotation").status_code == 200
    # A rotation: the first signature no cached key verifies refreshes the keys at once.
    rotated = generate_keypair(b"\x09" * 32)
    hostile_jwks.set_keys(rotated)
    assert Sender(rotated).post(client, server.webhook_url, "rotated").status_code == 200
    # Another, within the refresh interval: it cannot be checked yet, so fal must retry.
    again = generate_keypair(b"\x0a" * 32)
    hostile_jwks.set_keys(again)
    response = Sender(again).post(client, server.webhook_url, "rotated-again")
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "key_refresh_pending"  # not an outage of the JWKS
