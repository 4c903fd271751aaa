"""falhook.verify.testing: key pairs, fal-shaped bodies, the signer and the JWKS server."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from falhook.verify import Reason, WebhookVerificationError, parse_jwks, verify_signature
from falhook.verify.testing import (
    LAYOUTS,
    JWKSServer,
    KeyPair,
    Layout,
    fal_body,
    generate_keypair,
    jwks_document,
    sign,
)


def test_seeded_keypairs_are_deterministic() -> None:
    """The same seed gives the same key and kid; no seed gives a fresh key."""
    a, b = generate_keypair(b"\x05" * 32), generate_keypair(b"\x05" * 32)
    assert a.public_key == b.public_key and a.kid == b.kid
    assert generate_keypair().public_key != generate_keypair().public_key
    with pytest.raises(ValueError):
        generate_keypair(b"short")


def test_jwk_and_document_parse_back(keypair: KeyPair, other_keypair: KeyPair) -> None:
    """jwk() is an unpadded OKP/Ed25519 JWK that parse_jwks reads back."""
    jwk = keypair.jwk()
    assert (jwk["kty"], jwk["crv"], jwk["kid"]) == ("OKP", "Ed25519", keypair.kid)
    assert "=" not in jwk["x"]
    keys = parse_jwks(jwks_document(keypair, other_keypair))
    assert keys == (keypair.public_key, other_keypair.public_key)


def test_sign_returns_fal_headers(keypair: KeyPair) -> None:
    """Four canonical headers, lowercase hex, timestamp defaulting to now."""
    headers = sign(b"{}", "r", "u", keypair=keypair)
    assert set(headers) == {
        "X-Fal-Webhook-Request-Id",
        "X-Fal-Webhook-User-Id",
        "X-Fal-Webhook-Timestamp",
        "X-Fal-Webhook-Signature",
    }
    signature = headers["X-Fal-Webhook-Signature"]
    assert signature == signature.lower() and len(signature) == 128
    assert verify_signature(b"{}", headers, keys=keypair.public_key)


def test_fal_body_shape() -> None:
    """Compact by default: fal's field order, no spaces, error null on OK, big seed exact."""
    body = fal_body("req-1")
    assert body.startswith(b'{"request_id":"req-1","gateway_request_id":"req-1","status":"OK"')
    assert b"17454220438242315174" in body
    document = json.loads(body)
    assert document["status"] == "OK" and "payload_error" not in document
    assert document["payload"]["seed"] == 17454220438242315174
    error = json.loads(
        fal_body("r", status="ERROR", payload={"detail": []}, error="Invalid status code: 422")
    )
    assert (error["status"], error["error"]) == ("ERROR", "Invalid status code: 422")
    unserializable = json.loads(
        fal_body("r", payload=None, payload_error="not JSON serializable", gateway_request_id="g")
    )
    assert unserializable["payload"] is None and unserializable["gateway_request_id"] == "g"


def test_the_python_layout_is_the_2025_capture() -> None:
    """Sorted keys, ", "/": " separators, ASCII escapes: what json.dumps writes back."""
    body = fal_body("req-1", payload={"prompt": "café"}, layout="python")
    assert body.startswith(b'{"error": null, "gateway_request_id": "req-1", "payload": {')
    assert b"caf\\u00e9" in body
    assert json.dumps(json.loads(body)).encode() == body
    with pytest.raises(ValueError, match="compact, python"):
        fal_body("r", layout="pretty")  # type: ignore[arg-type]


def test_the_compact_layout_holds_what_re_serialization_changes() -> None:
    """Raw UTF-8, compact separators, fal's (unsorted) order: no json.dumps setting one
    might try reproduces both layouts."""
    payload = {"prompt": "café"}
    body = fal_body("req-1", payload=payload)
    assert "café".encode() in body and b", " not in body
    fields = ["request_id", "gateway_request_id", "status", "payload", "error"]
    assert list(json.loads(body)) == fields
    assert json.loads(body) == json.loads(fal_body("req-1", payload=payload, layout="python"))
    attempts = [
        json.dumps(json.loads(body)),
        json.dumps(json.loads(body), sort_keys=True),
        json.dumps(json.loads(body), separators=(",", ":")),  # still escapes the é
    ]
    assert all(attempt.encode() != body for attempt in attempts)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_raw_bytes_verify_in_every_layout(keypair: KeyPair, layout: Layout) -> None:
    body = fal_body("req-1", payload={"prompt": "über"}, layout=layout)
    headers = sign(body, "req-1", "u", keypair=keypair)
    assert verify_signature(body, headers, keys=keypair.public_key).request_id == "req-1"


def test_the_classic_mistake_fails_with_the_kit(keypair: KeyPair) -> None:
    """Verifying json.dumps(json.loads(body)) instead of the raw bytes: a test built on the
    kit's default body fails, with the message that names the cause."""
    body = fal_body("req-1")
    headers = sign(body, "req-1", "u", keypair=keypair)
    reserialized = json.dumps(json.loads(body)).encode()
    with pytest.raises(WebhookVerificationError) as info:
        verify_signature(reserialized, headers, keys=keypair.public_key)
    assert info.value.reason is Reason.INVALID_SIGNATURE
    assert "verify the raw request bytes, not re-serialized JSON" in str(info.value)


def test_keypair_save_and_load(keypair: KeyPair, tmp_path: Path) -> None:
    """A key file round-trips and holds the JWKS for the receiver side."""
    path = tmp_path / "key.json"
    keypair.save(path)
    loaded = KeyPair.load(path)
    assert loaded.public_key == keypair.public_key and loaded.kid == keypair.kid
    assert parse_jwks(json.loads(path.read_text())["jwks"]) == (keypair.public_key,)
    assert path.stat().st_mode & 0o077 == 0
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError):
        KeyPair.load(tmp_path / "bad.json")


def test_jwks_server_serves_rotates_and_fails(keypair: KeyPair, other_keypair: KeyPair) -> None:
    """The loopback server serves, rotates, simulates outages and counts requests."""
    with JWKSServer(keypair) as server, httpx.Client() as http:
        assert parse_jwks(http.get(server.url).content) == (keypair.public_key,)
        server.set_keys(other_keypair)
        assert parse_jwks(http.get(server.url).content) == (other_keypair.public_key,)
        server.fail(503)
        assert http.get(server.url).status_code == 503
        server.fail(None)
        server.set_document({"keys": []})
        assert http.get(server.url).json() == {"keys": []}
        assert http.get(server.url.replace("jwks.json", "other")).status_code == 404
        assert server.requests == 5
