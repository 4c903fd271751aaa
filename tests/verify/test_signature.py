"""verify_signature / verify_signature_async: the fal scheme, every reason, properties."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from falhook.verify import (
    KeysUnavailableError,
    Reason,
    VerifiedWebhook,
    WebhookVerificationError,
    verify_signature,
    verify_signature_async,
)
from falhook.verify.testing import (
    JWKSServer,
    KeyPair,
    Layout,
    fal_body,
    generate_keypair,
    jwks_document,
    sign,
)

NOW = 1_752_019_770
RID = "5057fca7-6e34-4a4b-a8b5-1a2b3c4d5e6f"
UID = "github|42"

# Known answer: seed bytes(range(32)), this body, request id, user id and timestamp.
KAT_SEED = bytes(range(32))
KAT_BODY = (
    b'{"error": null, "gateway_request_id": "5057fca7", "payload": {"seed": '
    b'17454220438242315174}, "request_id": "5057fca7", "status": "OK"}'
)
KAT_SIGNATURE = (
    "502f9fc05c2b21f2a9818491e9909dfde3eaf9dc3ec4652347efa55b0cd0244e"
    "9e35e95eeb22e8206382eec0b84cd95392dac3a47023b011f04b041b509b2c0e"
)


def _reason(exc_info: pytest.ExceptionInfo[WebhookVerificationError]) -> Reason:
    return exc_info.value.reason


def test_known_answer_matches_an_independent_implementation() -> None:
    """fal's message format signed by `cryptography` gives our constant, and we accept it."""
    message = f"5057fca7\ngithub|42\n1752019770\n{hashlib.sha256(KAT_BODY).hexdigest()}"
    private = Ed25519PrivateKey.from_private_bytes(KAT_SEED)
    assert private.sign(message.encode()).hex() == KAT_SIGNATURE  # Ed25519 is deterministic
    private.public_key().verify(bytes.fromhex(KAT_SIGNATURE), message.encode())

    kp = generate_keypair(KAT_SEED)
    headers = sign(KAT_BODY, "5057fca7", "github|42", 1752019770, keypair=kp)
    assert headers["X-Fal-Webhook-Signature"] == KAT_SIGNATURE
    result = verify_signature(KAT_BODY, headers, keys=kp.public_key, now=1752019770)
    assert result == VerifiedWebhook("5057fca7", "github|42", 1752019770)


def _signed(kp: KeyPair, body: bytes | None = None, ts: int = NOW) -> tuple[bytes, dict[str, str]]:
    body = fal_body(RID) if body is None else body
    return body, sign(body, RID, UID, ts, keypair=kp)


def test_valid_delivery_returns_what_was_signed(keypair: KeyPair) -> None:
    """The result carries the signed ids and the timestamp as an int."""
    body, headers = _signed(keypair)
    result = verify_signature(body, headers, keys=keypair.public_key, now=NOW)
    assert (result.request_id, result.user_id, result.timestamp) == (RID, UID, NOW)


def test_uppercase_hex_and_header_casing_accepted(keypair: KeyPair) -> None:
    """HTTP names are case-insensitive; the hex may be upper case."""
    body, headers = _signed(keypair)
    shouted = {k.upper(): v.upper() if k.endswith("Signature") else v for k, v in headers.items()}
    assert verify_signature(body, shouted, keys=[keypair.public_key], now=NOW).request_id == RID


def test_asgi_byte_pairs(keypair: KeyPair) -> None:
    """The receiver passes scope["headers"] directly."""
    body, headers = _signed(keypair)
    raw = [(b"host", b"x")] + [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    assert verify_signature(body, raw, keys=keypair.public_key, now=NOW).user_id == UID


@pytest.mark.parametrize("body_type", [bytearray, memoryview])
def test_bytes_like_bodies(keypair: KeyPair, body_type: type) -> None:
    """bytearray and memoryview bodies are the same bytes."""
    body, headers = _signed(keypair)
    assert verify_signature(body_type(body), headers, keys=keypair.public_key, now=NOW)


def test_str_body_is_a_type_error(keypair: KeyPair) -> None:
    """A str body is a programming error (the raw bytes are needed), not an inauthentic one."""
    body, headers = _signed(keypair)
    with pytest.raises(TypeError):
        verify_signature(body.decode(), headers, keys=keypair.public_key, now=NOW)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("offset", "reason"),
    [
        (-300, None),
        (300, None),
        (-301, Reason.TIMESTAMP_TOO_OLD),
        (301, Reason.TIMESTAMP_TOO_NEW),
    ],
)
def test_tolerance_boundary(keypair: KeyPair, offset: int, reason: Reason | None) -> None:
    """Exactly 300 s passes in both directions; 301 s fails with a direction."""
    body, headers = _signed(keypair, ts=NOW + offset)
    if reason is None:
        assert verify_signature(body, headers, keys=keypair.public_key, now=NOW)
    else:
        with pytest.raises(WebhookVerificationError) as info:
            verify_signature(body, headers, keys=keypair.public_key, now=NOW)
        assert _reason(info) is reason


def test_tolerance_is_configurable(keypair: KeyPair) -> None:
    """A stricter or looser window applies; a negative one is a programming error."""
    body, headers = _signed(keypair, ts=NOW - 60)
    with pytest.raises(WebhookVerificationError) as info:
        verify_signature(body, headers, keys=keypair.public_key, now=NOW, tolerance=30)
    assert _reason(info) is Reason.TIMESTAMP_TOO_OLD
    body, headers = _signed(keypair, ts=NOW - 3000)
    assert verify_signature(body, headers, keys=keypair.public_key, now=NOW, tolerance=3600)
    with pytest.raises(ValueError):
        verify_signature(body, headers, keys=keypair.public_key, now=NOW, tolerance=-1)


def test_now_defaults_to_wall_clock(keypair: KeyPair) -> None:
    """Without now=, a delivery signed long ago is too old."""
    body, headers = _signed(keypair, ts=NOW)
    with pytest.raises(WebhookVerificationError) as info:
        verify_signature(body, headers, keys=keypair.public_key)
    assert _reason(info) is Reason.TIMESTAMP_TOO_OLD


@pytest.mark.parametrize(
    ("layout", "separators"), [("compact", (", ", ": ")), ("python", (",", ":"))]
)
def test_reserialized_json_body_fails(
    keypair: KeyPair, layout: Layout, separators: tuple[str, str]
) -> None:
    """Parsing and re-dumping the body in another layout changes the bytes."""
    body = fal_body(RID, layout=layout)
    headers = sign(body, RID, UID, NOW, keypair=keypair)
    reserialized = json.dumps(json.loads(body), separators=separators).encode()
    with pytest.raises(WebhookVerificationError) as info:
        verify_signature(reserialized, headers, keys=keypair.public_key, now=NOW)
    assert _reason(info) is Reason.INVALID_SIGNATURE


def test_body_with_integer_above_2_53(keypair: KeyPair) -> None:
    """The observed seed 17454220438242315174 does not matter: bytes are verified as is."""
    body = fal_body(RID, payload={"seed": 17454220438242315174})
    assert b"17454220438242315174" in body
    body, headers = _signed(keypair, body)
    assert verify_signature(body, headers, keys=keypair.public_key, now=NOW)


@pytest.mark.parametrize("field", ["request_id", "user_id", "timestamp", "body"])
def test_tampering_with_any_signed_part_fails(keypair: KeyPair, field: str) -> None:
    """Each part of the message is covered by the signature."""
    body, headers = _signed(keypair)
    if field == "request_id":
        headers["X-Fal-Webhook-Request-Id"] = "other"
    elif field == "user_id":
        headers["X-Fal-Webhook-User-Id"] = "other"
    elif field == "timestamp":
        headers["X-Fal-Webhook-Timestamp"] = str(NOW + 1)
    else:
        body = body + b" "
    with pytest.raises(WebhookVerificationError) as info:
        verify_signature(body, headers, keys=keypair.public_key, now=NOW)
    assert _reason(info) is Reason.INVALID_SIGNATURE


def test_wrong_key_is_invalid_signature_and_any_key_may_verify(
    keypair: KeyPair, other_keypair: KeyPair
) -> None:
    """No kid in the header: every key is tried, and any one verifying is enough."""
    body, headers = _signed(keypair)
    with pytest.raises(WebhookVerificationError) as info:
        verify_signature(body, headers, keys=other_keypair.public_key, now=NOW)
    assert _reason(info) is Reason.INVALID_SIGNATURE
    keys = [other_keypair.public_key, keypair.public_key]
    assert verify_signature(body, headers, keys=keys, now=NOW)


def test_missing_and_malformed_headers(keypair: KeyPair) -> None:
    """Presence is checked before formats, formats before time."""
    body, headers = _signed(keypair, ts=NOW - 10_000)
    del headers["X-Fal-Webhook-Signature"]
    headers["X-Fal-Webhook-Timestamp"] = "soon"
    with pytest.raises(WebhookVerificationError) as info:
        verify_signature(body, headers, keys=keypair.public_key, now=NOW)
    assert _reason(info) is Reason.MISSING_HEADER
    assert info.value.header == "X-Fal-Webhook-Signature"
    headers["X-Fal-Webhook-Signature"] = "00" * 64
    with pytest.raises(WebhookVerificationError) as info:
        verify_signature(body, headers, keys=keypair.public_key, now=NOW)
    assert _reason(info) is Reason.MALFORMED_HEADER


def test_user_pinning_checked_before_crypto(keypair: KeyPair) -> None:
    """A delivery for another user fails as user_mismatch even with a forged signature."""
    body, headers = _signed(keypair)
    headers["X-Fal-Webhook-Signature"] = "00" * 64
    with pytest.raises(WebhookVerificationError) as info:
        verify_signature(body, headers, keys=keypair.public_key, now=NOW, user_id="me")
    assert _reason(info) is Reason.USER_MISMATCH


def test_user_pinning_from_env(keypair: KeyPair, monkeypatch: pytest.MonkeyPatch) -> None:
    """FALHOOK_USER_ID pins at call time; empty means unset; an argument wins."""
    body, headers = _signed(keypair)
    monkeypatch.setenv("FALHOOK_USER_ID", "someone-else")
    with pytest.raises(WebhookVerificationError) as info:
        verify_signature(body, headers, keys=keypair.public_key, now=NOW)
    assert _reason(info) is Reason.USER_MISMATCH
    assert verify_signature(body, headers, keys=keypair.public_key, now=NOW, user_id=UID)
    monkeypatch.setenv("FALHOOK_USER_ID", UID)
    assert verify_signature(body, headers, keys=keypair.public_key, now=NOW)
    monkeypatch.setenv("FALHOOK_USER_ID", "")
    assert verify_signature(body, headers, keys=keypair.public_key, now=NOW)


def test_static_keys_object_is_parsed_once(keypair: KeyPair) -> None:
    """The same JWKS dict is parsed on first use only (the warm path never re-parses)."""
    from falhook.verify import signature

    body, headers = _signed(keypair)
    document: dict[str, Any] = {"keys": [keypair.jwk()]}
    verify_signature(body, headers, keys=document, now=NOW)
    cached = signature._STATIC_CACHE[id(document)][1]
    verify_signature(body, headers, keys=document, now=NOW)
    assert signature._STATIC_CACHE[id(document)][1] is cached


def test_invalid_static_keys_are_keys_unavailable(keypair: KeyPair) -> None:
    """Static keys that are not keys are an outage of keys, not an inauthentic delivery."""
    body, headers = _signed(keypair)
    with pytest.raises(KeysUnavailableError):
        verify_signature(body, headers, keys={"keys": []}, now=NOW)


def test_async_variant_same_contract(keypair: KeyPair) -> None:
    """verify_signature_async accepts and rejects exactly like the sync one."""
    body, headers = _signed(keypair)

    async def main() -> None:
        ok = await verify_signature_async(body, headers, keys=keypair.public_key, now=NOW)
        assert ok.request_id == RID
        with pytest.raises(WebhookVerificationError) as info:
            await verify_signature_async(body + b"x", headers, keys=keypair.public_key, now=NOW)
        assert _reason(info) is Reason.INVALID_SIGNATURE

    asyncio.run(main())


def test_end_to_end_jwks_url_from_env(
    keypair: KeyPair, other_keypair: KeyPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FALHOOK_JWKS_URL is read at call time; keys come from a real loopback server."""
    with JWKSServer(keypair) as server:
        monkeypatch.setenv("FALHOOK_JWKS_URL", server.url)
        body, headers = _signed(keypair)
        assert verify_signature(body, headers, now=NOW).request_id == RID
        assert verify_signature(body, headers, now=NOW)  # cached: no second fetch
        assert server.requests == 1

        async def main() -> None:
            assert await verify_signature_async(body, headers, jwks_url=server.url, now=NOW)

        asyncio.run(main())
        # The async client shares the process-wide cache for the URL.
        assert server.requests == 1

        body, headers = _signed(other_keypair)
        # No cached key verifies: the keys are refreshed once at once, and still none does.
        with pytest.raises(WebhookVerificationError):
            verify_signature(body, headers, jwks_url=server.url, now=NOW)
        # Within the refresh interval another miss cannot be checked: it may be a key
        # published since, so this is "could not check" (503), not "forged".
        with pytest.raises(KeysUnavailableError):
            verify_signature(body, headers, jwks_url=server.url, now=NOW)
        assert server.requests == 2


@pytest.mark.parametrize("spelling", ["path", "file_url"])
def test_a_jwks_file_in_the_env_works_as_in_serve(
    keypair: KeyPair,
    other_keypair: KeyPair,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    spelling: str,
) -> None:
    """FALHOOK_JWKS_URL may name a local file (keygen's jwks.json), as `falhook serve` takes it."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks_document(keypair)))
    monkeypatch.setenv("FALHOOK_JWKS_URL", str(path) if spelling == "path" else f"file://{path}")
    body, headers = _signed(keypair)
    assert verify_signature(body, headers, now=NOW).request_id == RID
    assert asyncio.run(verify_signature_async(body, headers, now=NOW)).request_id == RID
    # A rewritten file (keygen --force) is read again: the old key no longer verifies.
    path.write_text(json.dumps(jwks_document(other_keypair)))
    os.utime(path, ns=(1, 1))  # a different mtime even on a coarse clock
    with pytest.raises(WebhookVerificationError):
        verify_signature(body, headers, now=NOW)


@pytest.mark.parametrize(("content", "needle"), [(None, "not found"), ("[", "not valid JSON")])
def test_an_unusable_jwks_file_is_keys_unavailable_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str | None, needle: str
) -> None:
    path = tmp_path / "jwks.json"
    if content is not None:
        path.write_text(content)
    body, headers = _signed(generate_keypair(b"\x05" * 32))
    with pytest.raises(KeysUnavailableError, match=needle) as info:
        verify_signature(body, headers, jwks_url=str(path), now=NOW)
    assert str(path) in str(info.value)


def test_default_jwks_url(monkeypatch: pytest.MonkeyPatch) -> None:
    """fal's current JWKS host is the default; the env var overrides it."""
    from falhook.verify.signature import default_jwks_url

    assert default_jwks_url() == "https://rest.fal.ai/.well-known/jwks.json"
    monkeypatch.setenv("FALHOOK_JWKS_URL", "http://127.0.0.1:1/jwks")
    assert default_jwks_url() == "http://127.0.0.1:1/jwks"


# --- properties -------------------------------------------------------------------------

PROPERTY_KEYPAIR = generate_keypair(b"\x09" * 32)
NAMES = st.sampled_from(
    [
        "X-Fal-Webhook-Request-Id",
        "X-Fal-Webhook-User-Id",
        "X-Fal-Webhook-Timestamp",
        "X-Fal-Webhook-Signature",
        "Content-Type",
    ]
)


@st.composite
def _any_casing(draw: st.DrawFn, name: str) -> str:
    flips = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    return "".join(c.upper() if f else c.lower() for c, f in zip(name, flips, strict=True))


header_values = st.one_of(
    st.text(),
    st.text(alphabet="0123456789abcdefABCDEF \t", min_size=120, max_size=130),
    st.integers(min_value=0, max_value=10**25).map(str),
    st.binary().map(lambda b: b.decode("latin-1")),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    headers=st.dictionaries(NAMES.flatmap(_any_casing), header_values, max_size=6),
    body=st.binary(max_size=256),
)
def test_arbitrary_headers_only_raise_verification_errors(
    headers: dict[str, str], body: bytes
) -> None:
    """Whatever the header values, only WebhookVerificationError escapes."""
    with contextlib.suppress(WebhookVerificationError):
        verify_signature(body, headers, keys=PROPERTY_KEYPAIR.public_key, now=NOW)


@settings(max_examples=200, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(NAMES.map(lambda n: n.lower().encode()), st.binary(max_size=140)), max_size=6
    )
)
def test_arbitrary_asgi_bytes_only_raise_verification_errors(
    pairs: list[tuple[bytes, bytes]],
) -> None:
    """Raw ASGI byte values, including invalid UTF-8, only ever fail as verification errors."""
    with contextlib.suppress(WebhookVerificationError):
        verify_signature(b"{}", pairs, keys=PROPERTY_KEYPAIR.public_key, now=NOW)


@settings(max_examples=200, deadline=None)
@given(signature=st.text(max_size=200), body=st.binary(max_size=128))
def test_arbitrary_signatures_never_pass(signature: str, body: bytes) -> None:
    """A made-up signature header is rejected, never accepted, never a crash."""
    headers = sign(body, RID, UID, NOW, keypair=PROPERTY_KEYPAIR)
    headers["X-Fal-Webhook-Signature"] = signature
    with pytest.raises(WebhookVerificationError):
        verify_signature(body, headers, keys=PROPERTY_KEYPAIR.public_key, now=NOW)


printable_ids = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Cf", "Co", "Cn")),
    min_size=1,
    max_size=40,
).filter(str.isprintable)


@settings(max_examples=200, deadline=None)
@given(
    body=st.binary(max_size=512),
    request_id=printable_ids,
    user_id=printable_ids,
    skew=st.integers(min_value=-300, max_value=300),
)
def test_valid_signed_inputs_always_pass(
    body: bytes, request_id: str, user_id: str, skew: int
) -> None:
    """Anything signed the fal way, within tolerance, verifies, in str and ASGI form."""
    headers = sign(body, request_id, user_id, NOW + skew, keypair=PROPERTY_KEYPAIR)
    key = PROPERTY_KEYPAIR.public_key
    expected = VerifiedWebhook(request_id, user_id, NOW + skew)
    assert verify_signature(body, headers, keys=key, now=NOW) == expected
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    assert verify_signature(body, raw, keys=key, now=NOW) == expected
