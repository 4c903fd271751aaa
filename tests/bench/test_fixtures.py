from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import pytest
from nacl.signing import SigningKey, VerifyKey
from starlette.testclient import TestClient

from bench import fixtures, targets


def _verify_key_from_jwks(path: Path) -> VerifyKey:
    document = json.loads(path.read_text())
    (jwk,) = document["keys"]
    assert (jwk["kty"], jwk["crv"]) == ("OKP", "Ed25519")
    assert "=" not in jwk["x"]
    return VerifyKey(base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4)))


def test_deliveries_are_unique_fal_shaped_and_verify(tmp_path: Path) -> None:
    key = SigningKey.generate()
    verify_key = _verify_key_from_jwks(fixtures.write_jwks(key, tmp_path / "jwks.json"))
    path = fixtures.write_deliveries(key, 200, tmp_path / "d.tsv", timestamp=1_700_000_000)
    deliveries = list(fixtures.read_deliveries(path))

    assert len(deliveries) == 200
    assert len({d.request_id for d in deliveries}) == 200
    assert len({d.signature for d in deliveries}) == 200
    for d in deliveries:
        assert abs(len(d.body) - fixtures.TARGET_BODY_BYTES) < 64
        parsed = json.loads(d.body)
        # Byte-for-byte what fal sends: json.dumps(sort_keys=True) with default separators.
        assert json.dumps(parsed, sort_keys=True).encode() == d.body
        assert parsed["request_id"] == parsed["gateway_request_id"] == d.request_id
        assert parsed["status"] == "OK" and parsed["error"] is None
        assert d.timestamp == "1700000000"
        digest = hashlib.sha256(d.body).hexdigest()
        message = f"{d.request_id}\n{d.user_id}\n{d.timestamp}\n{digest}".encode()
        verify_key.verify(message, bytes.fromhex(d.signature))


def test_tampered_body_does_not_verify() -> None:
    key = SigningKey.generate()
    (d,) = fixtures.iter_deliveries(key, 1)
    message = fixtures.signed_message(d.request_id, d.user_id, d.timestamp, d.body + b" ")
    with pytest.raises(Exception, match="forged or corrupt"):
        key.verify_key.verify(message, bytes.fromhex(d.signature))


@pytest.fixture
def signed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[fixtures.Delivery]:
    key = SigningKey.generate()
    monkeypatch.setenv("BENCH_JWKS_FILE", str(fixtures.write_jwks(key, tmp_path / "jwks.json")))
    monkeypatch.setenv("BENCH_DB_PATH", str(tmp_path / "naive.db"))
    return list(fixtures.iter_deliveries(key, 2))


def test_verify_only_reference_accepts_signed_and_rejects_forged(
    signed: list[fixtures.Delivery],
) -> None:
    with TestClient(targets.verify_only_app()) as client:
        d = signed[0]
        ok = client.post(targets.WEBHOOK_PATH, content=d.body, headers=d.headers())
        assert ok.status_code == 200 and ok.json() == {"request_id": d.request_id}
        forged = client.post(targets.WEBHOOK_PATH, content=d.body + b" ", headers=d.headers())
        assert forged.status_code == 401
        stale = {**d.headers(), "X-Fal-Webhook-Timestamp": "1"}
        assert client.post(targets.WEBHOOK_PATH, content=d.body, headers=stale).status_code == 401
        assert client.get("/healthz").status_code == 200


def test_naive_reference_stores_once_and_answers_duplicates(
    signed: list[fixtures.Delivery],
) -> None:
    with TestClient(targets.naive_app()) as client:
        d = signed[1]
        first = client.post(targets.WEBHOOK_PATH, content=d.body, headers=d.headers())
        again = client.post(targets.WEBHOOK_PATH, content=d.body, headers=d.headers())
        assert first.json() == {"request_id": d.request_id, "duplicate": False}
        assert again.status_code == 200 and again.json()["duplicate"] is True


def test_bare_reference_answers_any_body() -> None:
    with TestClient(targets.bare_app()) as client:
        assert client.post(targets.WEBHOOK_PATH, content=b"x" * 2048).status_code == 200
