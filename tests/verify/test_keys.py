"""PublicKey construction, JWK/JWKS parsing and static key sources."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from falhook.verify.errors import KeysUnavailableError
from falhook.verify.keys import MAX_KEYS, PublicKey, load_keys, parse_jwks
from falhook.verify.testing import KeyPair, jwks_document


def _x(kp: KeyPair, *, padded: bool) -> str:
    text = base64.urlsafe_b64encode(bytes(kp.public_key)).decode()
    return text if padded else text.rstrip("=")


@pytest.mark.parametrize("padded", [True, False])
def test_from_jwk_accepts_padded_and_unpadded_x(keypair: KeyPair, padded: bool) -> None:
    """fal's padding is undocumented; both forms decode to the same key."""
    key = PublicKey.from_jwk({"kty": "OKP", "crv": "Ed25519", "x": _x(keypair, padded=padded)})
    assert key == keypair.public_key


def test_from_jwk_without_kty_and_crv(keypair: KeyPair) -> None:
    """fal documents only `x`; absent kty/crv are fine."""
    assert PublicKey.from_jwk({"x": _x(keypair, padded=False)}) == keypair.public_key


@pytest.mark.parametrize(
    "jwk",
    [
        {"kty": "RSA", "x": "AAAA"},
        {"kty": "OKP", "crv": "X25519", "x": "A" * 43},
        {"kty": "OKP", "crv": "Ed25519", "x": "A" * 42},  # 31 bytes
        {"kty": "OKP", "crv": "Ed25519", "x": "A" * 44},  # 33 bytes
        {"kty": "OKP", "crv": "Ed25519", "x": "!!!" + "A" * 40},
        {"kty": "OKP", "crv": "Ed25519", "x": 12},
        {"kty": "OKP", "crv": "Ed25519"},
        {"kty": "OKP", "crv": "Ed25519", "x": "A" * 43 + "==="},
    ],
)
def test_from_jwk_rejects_unusable_keys(jwk: dict[str, object]) -> None:
    """Keys are validated at construction, with ValueError."""
    with pytest.raises(ValueError):
        PublicKey.from_jwk(jwk)


def test_equality_hash_kid_and_round_trips(keypair: KeyPair) -> None:
    """Equality ignores kid; bytes and base64url round-trip."""
    raw = bytes(keypair.public_key)
    a = PublicKey.from_bytes(raw, kid="a")
    b = PublicKey.from_base64url(keypair.public_key.to_base64url(), kid="b")
    assert a == b and hash(a) == hash(b) and a.kid == "a"
    assert a != PublicKey(b"\x00" * 32)
    assert a != "not a key"
    assert "PublicKey(" in repr(a)
    with pytest.raises(ValueError):
        PublicKey.from_bytes(raw[:31])
    with pytest.raises(TypeError):
        PublicKey("x" * 32)  # type: ignore[arg-type]


def test_verify_never_raises(keypair: KeyPair) -> None:
    """Wrong-length or forged signatures are just False."""
    sig = keypair.signing_key.sign(b"m").signature
    assert keypair.public_key.verify(b"m", sig)
    assert not keypair.public_key.verify(b"n", sig)
    assert not keypair.public_key.verify(b"m", sig[:63])
    assert not keypair.public_key.verify(b"m", b"")


def test_parse_jwks_skips_bad_keys(keypair: KeyPair, other_keypair: KeyPair) -> None:
    """One bad or foreign key does not take the set down; duplicates collapse."""
    document = jwks_document(keypair, other_keypair, keypair)
    document["keys"].insert(0, {"kty": "RSA", "n": "abc", "e": "AQAB"})
    document["keys"].append("garbage")
    keys = parse_jwks(document)
    assert keys == (keypair.public_key, other_keypair.public_key)
    assert keys[0].kid == keypair.kid


def test_parse_jwks_refuses_a_key_set_too_large_to_try(keypair: KeyPair) -> None:
    # Each delivery whose key is not cached is tried against every key: a hostile or broken
    # source listing 20,000 held the event loop for seconds a request.
    document = jwks_document(keypair)
    document["keys"] = document["keys"] * (MAX_KEYS + 1)
    with pytest.raises(KeysUnavailableError, match=f"lists {MAX_KEYS + 1} keys; over {MAX_KEYS}"):
        parse_jwks(document)
    document["keys"] = document["keys"][:MAX_KEYS]
    assert parse_jwks(document) == (keypair.public_key,)


@pytest.mark.parametrize(
    "document",
    [b"not json", "[]", '{"keys": {}}', "{}", {"keys": []}, {"keys": [{"kty": "RSA"}]}, b"\xff"],
)
def test_parse_jwks_invalid_documents(document: object) -> None:
    """No usable key counts as invalid, like an unreachable JWKS."""
    with pytest.raises(KeysUnavailableError):
        parse_jwks(document)  # type: ignore[arg-type]


def test_load_keys_sources(keypair: KeyPair, tmp_path: Path) -> None:
    """Every KeysLike form yields the same keys."""
    document = jwks_document(keypair)
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(document))
    expected = (keypair.public_key,)
    assert load_keys(document) == expected
    assert load_keys(json.dumps(document)) == expected
    assert load_keys(json.dumps(document).encode()) == expected
    assert load_keys(path) == expected
    assert load_keys(str(path)) == expected
    assert load_keys(keypair.public_key) == expected
    assert load_keys([keypair.public_key]) == expected
    assert load_keys([bytes(keypair.public_key)]) == expected


@pytest.mark.parametrize("source", [[b"short"], [], ["text"], 42, "/no/such/file.json"])
def test_load_keys_invalid_static_keys(source: object) -> None:
    """Invalid static keys are KeysUnavailableError, never a crash."""
    with pytest.raises(KeysUnavailableError):
        load_keys(source)  # type: ignore[arg-type]
