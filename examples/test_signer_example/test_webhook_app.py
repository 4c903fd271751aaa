"""How a user tests a fal webhook endpoint with `falhook.verify.testing`."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import webhook_app  # type: ignore[import-not-found]  # (mypy runs from the repo root)
from starlette.testclient import TestClient

from falhook.verify.testing import (
    LAYOUTS,
    JWKSServer,
    KeyPair,
    Layout,
    fal_body,
    generate_keypair,
    sign,
)

USER_ID = "my-fal-user"


@pytest.fixture(scope="session")
def fal_key() -> KeyPair:
    return generate_keypair()  # stands in for fal's signing key


@pytest.fixture
def client(fal_key: KeyPair, monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    with JWKSServer(fal_key) as jwks:  # the key's JWKS, served on loopback
        monkeypatch.setenv("FAL_JWKS_URL", jwks.url)
        webhook_app.received.clear()
        yield TestClient(webhook_app.app)


def post(client: TestClient, body: bytes, headers: dict[str, str]) -> int:
    return client.post("/webhooks/fal", content=body, headers=headers).status_code


def test_accepts_a_genuine_delivery(client: TestClient, fal_key: KeyPair) -> None:
    body = fal_body("req-1", payload={"images": [{"url": "https://v3.fal.media/x.png"}]})
    assert post(client, body, sign(body, "req-1", USER_ID, keypair=fal_key)) == 200
    assert webhook_app.received["req-1"]["payload"]["images"][0]["url"].endswith("x.png")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_accepts_every_layout(client: TestClient, fal_key: KeyPair, layout: Layout) -> None:
    # An endpoint that verified re-serialized JSON would fail here on one layout or the other.
    body = fal_body("req-6", payload={"prompt": "un café"}, layout=layout)
    assert post(client, body, sign(body, "req-6", USER_ID, keypair=fal_key)) == 200
    assert webhook_app.received["req-6"]["payload"]["prompt"] == "un café"


def test_accepts_an_error_delivery(client: TestClient, fal_key: KeyPair) -> None:
    body = fal_body("req-2", status="ERROR", payload=None, error="Invalid status code: 422")
    assert post(client, body, sign(body, "req-2", USER_ID, keypair=fal_key)) == 200
    assert webhook_app.received["req-2"]["error"] == "Invalid status code: 422"


def test_rejects_a_forged_delivery(client: TestClient) -> None:
    body = fal_body("req-3")
    forged = sign(body, "req-3", USER_ID, keypair=generate_keypair())
    assert post(client, body, forged) == 401
    assert "req-3" not in webhook_app.received


def test_rejects_a_tampered_body(client: TestClient, fal_key: KeyPair) -> None:
    body = fal_body("req-4")
    headers = sign(body, "req-4", USER_ID, keypair=fal_key)
    assert post(client, body.replace(b"dog", b"cat"), headers) == 401


def test_rejects_a_stale_timestamp(client: TestClient, fal_key: KeyPair) -> None:
    body = fal_body("req-5")
    old = int(time.time()) - 3600
    assert post(client, body, sign(body, "req-5", USER_ID, old, keypair=fal_key)) == 401
