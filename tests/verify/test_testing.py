"""falhook.verify.testing: key pairs, fal-shaped bodies, the signer and the JWKS server."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from falhook.verify import parse_jwks, verify_signature
from falhook.verify.testing import (
    JWKSServer,
    KeyPair,
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
    """Sorted keys, default separators, error null on OK, big seed kept exactly."""
    body = fal_body("req-1")
    assert body.startswith(b'{"error": null, "gateway_request_id": "req-1", "payload": {')
    assert b"17454220438242315174" in body
    document = json.loads(body)
    assert document["status"] == "OK" and "payload_error" not in document
    error = json.loads(
        fal_body("r", status="ERROR", payload={"detail": []}, error="Invalid status code: 422")
    )
    assert (error["status"], error["error"]) == ("ERROR", "Invalid status code: 422")
    unserializable = json.loads(
        fal_body("r", payload=None, payload_error="not JSON serializable", gateway_request_id="g")
    )
    assert unserializable["payload"] is None and unserializable["gateway_request_id"] == "g"


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
