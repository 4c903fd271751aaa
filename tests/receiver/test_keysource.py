"""The receiver's keys: a local JWKS file (read once) or a JWKS URL (cached client)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from falhook.receiver.keysource import KeySource
from falhook.verify import KeysUnavailableError, Reason, WebhookVerificationError
from falhook.verify.testing import JWKSServer, KeyPair, fal_body, generate_keypair, sign


def _pairs(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode()) for k, v in headers.items()]


def test_file_and_file_url_verify(jwks_file: Path, keypair: KeyPair) -> None:
    body = fal_body("r-1")
    headers = _pairs(sign(body, "r-1", "u-1", keypair=keypair))

    async def body_() -> None:
        for source in (f"{jwks_file}", f"file://{jwks_file}"):
            keys = KeySource(source, user_id=None, tolerance=300)
            assert (await keys.verify(body, keys.check_headers(headers))).request_id == "r-1"
            await keys.ready()
            assert keys.fetches == 0  # a file is not fetched

    asyncio.run(body_())


def test_missing_file_is_keys_unavailable_not_inauthentic(tmp_path: Path, keypair: KeyPair) -> None:
    body = fal_body("r-1")
    headers = _pairs(sign(body, "r-1", "u-1", keypair=keypair))
    keys = KeySource(str(tmp_path / "nope.json"), user_id=None, tolerance=300)

    async def body_() -> None:
        with pytest.raises(KeysUnavailableError):
            await keys.verify(body, keys.check_headers(headers))
        with pytest.raises(KeysUnavailableError):
            await keys.ready()

    asyncio.run(body_())


def test_user_pin_is_the_receivers_not_the_environment(
    jwks_file: Path, keypair: KeyPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FALHOOK_USER_ID", "someone-else")
    body = fal_body("r-1")
    headers = _pairs(sign(body, "r-1", "u-1", keypair=keypair))

    async def body_() -> None:
        unpinned = KeySource(str(jwks_file), user_id=None, tolerance=300)
        assert (await unpinned.verify(body, unpinned.check_headers(headers))).user_id == "u-1"
        pinned = KeySource(str(jwks_file), user_id="u-2", tolerance=300)
        with pytest.raises(WebhookVerificationError) as info:
            pinned.check_headers(headers)
        assert info.value.reason is Reason.USER_MISMATCH

    asyncio.run(body_())


def test_url_goes_through_the_cached_client(keypair: KeyPair) -> None:
    other = generate_keypair(b"\x02" * 32)
    with JWKSServer(keypair) as server:

        async def body_() -> None:
            keys = KeySource(server.url, user_id=None, tolerance=300)
            try:
                for i in range(3):
                    body = fal_body(f"r-{i}")
                    headers = _pairs(sign(body, f"r-{i}", "u-1", keypair=keypair))
                    assert (
                        await keys.verify(body, keys.check_headers(headers))
                    ).request_id == f"r-{i}"
                assert keys.fetches == 1  # cached across deliveries
                forged = fal_body("r-x")
                forged_headers = _pairs(sign(forged, "r-x", "u-1", keypair=other))
                # No key verifies: one refresh at once, and still none does (401)...
                with pytest.raises(WebhookVerificationError):
                    await keys.verify(forged, keys.check_headers(forged_headers))
                # ... then, within the refresh interval, a fresh one cannot be checked (503).
                fresh = fal_body("r-y")
                fresh_headers = _pairs(sign(fresh, "r-y", "u-1", keypair=other))
                with pytest.raises(KeysUnavailableError) as info:
                    await keys.verify(fresh, keys.check_headers(fresh_headers))
                assert info.value.reason is Reason.KEY_REFRESH_PENDING
            finally:
                await keys.aclose()

        asyncio.run(body_())
