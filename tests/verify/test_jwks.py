"""KeyCache policy and the JWKS clients (httpx.MockTransport, fake clocks, no sleeps)."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from falhook.verify import (
    AsyncJWKSClient,
    JWKSClient,
    KeyCache,
    KeyRefreshPendingError,
    KeysUnavailableError,
    Reason,
    VerifyError,
    WebhookVerificationError,
    get_async_jwks_client,
    get_jwks_client,
)
from falhook.verify.jwks import CLOCK_SKEW_ALLOWANCE, MAX_TTL
from falhook.verify.testing import JWKSServer, KeyPair, fal_body, jwks_document, sign

from .conftest import FakeClock

NOW = 1_752_019_770
URL = "https://jwks.test/.well-known/jwks.json"


class FakeJWKS:
    """A MockTransport handler: serves the current document or fails; counts requests."""

    def __init__(self, *keypairs: KeyPair) -> None:
        self.document: object = jwks_document(*keypairs)
        self.status = 200
        self.error: Exception | None = None
        self.requests = 0
        self.gate: threading.Event | None = None
        self.gzip = False  # answer compressed whatever was asked
        self.accept_encoding: str | None = None

    def rotate(self, *keypairs: KeyPair) -> None:
        self.document = jwks_document(*keypairs)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        self.accept_encoding = request.headers.get("accept-encoding")
        if self.gate is not None:
            self.gate.wait(5)
        if self.error is not None:
            raise self.error
        if self.gzip:
            content = gzip.compress(json.dumps(self.document).encode())
            return httpx.Response(
                self.status, content=content, headers={"Content-Encoding": "gzip"}
            )
        return httpx.Response(self.status, json=self.document)

    def client(self, clock: Callable[[], float], **kwargs: Any) -> JWKSClient:
        http = httpx.Client(transport=httpx.MockTransport(self))
        return JWKSClient(URL, http_client=http, clock=clock, **kwargs)


def _delivery(kp: KeyPair, request_id: str = "req-1") -> tuple[bytes, dict[str, str]]:
    body = fal_body(request_id)
    return body, sign(body, request_id, "user-1", NOW, keypair=kp)


def sign_at(kp: KeyPair, timestamp: int, request_id: str = "req-t") -> tuple[bytes, dict[str, str]]:
    """A delivery signed at ``timestamp`` (Unix seconds)."""
    body = fal_body(request_id)
    return body, sign(body, request_id, "user-1", timestamp, keypair=kp)


def test_cache_policy_is_pure(clock: FakeClock) -> None:
    """fresh → expired → rate-limited, with no I/O involved."""
    cache = KeyCache(ttl=100, min_refresh_interval=10, clock=clock)
    assert cache.fresh() is None and cache.needs_fetch(clock())
    cache.begin(clock())
    cache.succeed((), clock())
    assert cache.fresh() == () and not cache.needs_fetch(clock())
    clock.advance(100)
    assert cache.fresh() is None and cache.needs_fetch(clock())
    cache.begin(clock())
    cache.fail("down", URL)
    assert cache.keys == () and not cache.needs_fetch(clock())  # stale, recently tried
    clock.advance(10)
    assert cache.needs_fetch(clock())
    assert (cache.fetches, cache.fetch_failures) == (2, 1)


def test_fetched_after_compares_the_ages_of_keys_and_delivery(clock: FakeClock) -> None:
    """Keys fetched more than CLOCK_SKEW_ALLOWANCE after the signed timestamp; the cache's
    clock is monotonic, so the delivery's age (wall clock) is set against the keys' age."""
    cache = KeyCache(clock=clock)
    assert not cache.fetched_after(NOW - 600, NOW)  # nothing fetched yet
    cache.begin(clock())
    clock.advance(3)  # a slow fetch: its start is what counts
    cache.succeed((), clock())
    clock.advance(60)
    assert cache.fetched_after(NOW - 69, NOW)  # signed 6 s before the fetch began
    assert not cache.fetched_after(NOW - 68, NOW)  # 5 s before: within the allowance
    assert not cache.fetched_after(NOW - 10, NOW)  # signed after the fetch


def test_ttl_is_clamped_to_24_hours(clock: FakeClock) -> None:
    """fal: never cache longer than 24 h."""
    assert KeyCache(ttl=7 * 86400).ttl == MAX_TTL == 86400
    with pytest.raises(ValueError):
        KeyCache(ttl=0)
    with pytest.raises(ValueError):
        KeyCache(min_refresh_interval=-1)


def test_clamped_ttl_refetches_after_24_hours(keypair: KeyPair, clock: FakeClock) -> None:
    """A 7-day TTL still refetches after one day."""
    fake = FakeJWKS(keypair)
    with fake.client(clock, ttl=7 * 86400) as client:
        client.get_keys()
        clock.advance(86400 - 1)
        client.get_keys()
        assert fake.requests == 1
        clock.advance(1)
        client.get_keys()
        assert fake.requests == 2


def test_ttl_expiry_refetches(keypair: KeyPair, other_keypair: KeyPair, clock: FakeClock) -> None:
    """Within the TTL keys are served from memory; after it they are fetched again."""
    fake = FakeJWKS(keypair)
    with fake.client(clock, ttl=60) as client:
        assert client.get_keys() == (keypair.public_key,)
        fake.rotate(other_keypair)
        clock.advance(59)
        assert client.get_keys() == (keypair.public_key,)
        clock.advance(1)
        assert client.get_keys() == (other_keypair.public_key,)
        assert client.fetches == 2 and client.fetch_failures == 0


def test_rotation_is_picked_up_via_refresh(
    keypair: KeyPair, other_keypair: KeyPair, clock: FakeClock
) -> None:
    """A signature from a new key triggers one refresh and then verifies."""
    fake = FakeJWKS(keypair)
    with fake.client(clock) as client:
        body, headers = _delivery(keypair)
        assert client.verify(body, headers, now=NOW).request_id == "req-1"
        fake.rotate(keypair, other_keypair)
        clock.advance(30)
        body, headers = _delivery(other_keypair, "req-2")
        assert client.verify(body, headers, now=NOW).request_id == "req-2"
        assert fake.requests == 2


def test_forged_flood_costs_a_bounded_number_of_fetches(
    keypair: KeyPair, other_keypair: KeyPair, clock: FakeClock
) -> None:
    """Forged signatures refresh at most once per min_refresh_interval; in between, "no
    cached key verifies" cannot be told from a key published since: 503, not 401."""
    fake = FakeJWKS(keypair)
    with fake.client(clock, min_refresh_interval=10) as client:
        body, headers = _delivery(other_keypair)  # not in the JWKS: forged
        inauthentic = 0
        for _ in range(1000):
            with pytest.raises((WebhookVerificationError, KeysUnavailableError)) as info:
                client.verify(body, headers, now=NOW)
            if isinstance(info.value, WebhookVerificationError):
                assert info.value.reason is Reason.INVALID_SIGNATURE
                inauthentic += 1  # a refresh ran and still no key verifies
            clock.advance(0.1)  # 100 s in all
        assert fake.requests <= 11
        assert 9 <= inauthentic <= 11


def test_refresh_is_rate_limited(keypair: KeyPair, clock: FakeClock) -> None:
    """refresh() runs once right after a regular fetch (a rotated key is picked up at
    once), then returns None until the interval has passed."""
    fake = FakeJWKS(keypair)
    with fake.client(clock, min_refresh_interval=10) as client:
        client.get_keys()
        assert client.refresh() == (keypair.public_key,)
        assert client.refresh() is None
        clock.advance(10)
        assert client.refresh() == (keypair.public_key,)
        assert client.refresh() is None
        assert fake.requests == 3


def test_stale_keys_served_when_refresh_fails(
    keypair: KeyPair, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An outage after the TTL keeps the old keys in service, with a warning."""
    fake = FakeJWKS(keypair)
    with fake.client(clock, ttl=60) as client:
        client.get_keys()
        fake.status = 503
        clock.advance(61)
        with caplog.at_level(logging.WARNING, logger="falhook.verify.jwks"):
            assert client.get_keys() == (keypair.public_key,)
        assert "serving cached keys" in caplog.text
        body, headers = _delivery(keypair)
        assert client.verify(body, headers, now=NOW)
        assert client.fetch_failures == 1
        assert client.refresh() is None  # rate-limited; stale keys remain
        clock.advance(10)
        assert client.refresh() is None  # failed again; stale keys remain
        assert client.get_keys() == (keypair.public_key,)


@pytest.mark.parametrize(
    "failure",
    ["503", "connect", "not-json", "no-ed25519", "compressed"],
)
def test_cold_failure_is_keys_unavailable(keypair: KeyPair, clock: FakeClock, failure: str) -> None:
    """Nothing cached and nothing fetchable: KeysUnavailableError, never a 401 reason."""
    fake = FakeJWKS(keypair)
    if failure == "503":
        fake.status = 503
    elif failure == "connect":
        fake.error = httpx.ConnectError("refused")
    elif failure == "not-json":
        fake.document = "not a jwks"
    elif failure == "compressed":
        # Inflated before any size cap could see it (a 200 KB gzip of zeros is 200 MB), so
        # the keys are asked for uncompressed and a compressed answer is refused unread.
        fake.gzip = True
    else:
        fake.document = {"keys": [{"kty": "RSA", "n": "x", "e": "AQAB"}]}
    with fake.client(clock) as client:
        body, headers = _delivery(keypair)
        with pytest.raises(KeysUnavailableError):
            client.verify(body, headers, now=NOW)
        with pytest.raises(KeysUnavailableError):
            client.refresh()
        assert fake.accept_encoding == "identity"
        # Rate-limited on a cold cache too: no fetch per caller while the JWKS fails.
        assert fake.requests == 1
        # Recovery: once the interval has passed, a call on a cold cache fetches again.
        fake.status, fake.error, fake.document = 200, None, jwks_document(keypair)
        fake.gzip = False
        clock.advance(10)
        assert client.verify(body, headers, now=NOW)


def test_concurrent_threads_share_one_fetch(keypair: KeyPair) -> None:
    """Threads on a cold cache wait for a single in-flight fetch."""
    fake = FakeJWKS(keypair)
    fake.gate = threading.Event()
    client = fake.client(FakeClock())
    results: list[object] = []
    threads = [threading.Thread(target=lambda: results.append(client.get_keys())) for _ in range(8)]
    for thread in threads:
        thread.start()
    fake.gate.set()
    for thread in threads:
        thread.join()
    client.close()
    assert fake.requests == 1
    assert results == [(keypair.public_key,)] * 8


class AsyncFake(FakeJWKS):
    """The async twin: the handler awaits a gate so all callers pile up first."""

    def __init__(self, *keypairs: KeyPair) -> None:
        super().__init__(*keypairs)
        self.async_gate: asyncio.Event | None = None

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if self.async_gate is not None:
            await self.async_gate.wait()
        if self.error is not None:
            raise self.error
        return httpx.Response(self.status, json=self.document)

    def async_client(self, clock: Callable[[], float], **kwargs: Any) -> AsyncJWKSClient:
        http = httpx.AsyncClient(transport=httpx.MockTransport(self.handle))
        return AsyncJWKSClient(URL, http_client=http, clock=clock, **kwargs)


def test_concurrent_async_callers_share_one_fetch(keypair: KeyPair) -> None:
    """asyncio.gather of many verifications on a cold cache makes exactly one request."""
    fake = AsyncFake(keypair)
    body, headers = _delivery(keypair)

    async def main() -> None:
        fake.async_gate = asyncio.Event()
        async with fake.async_client(FakeClock()) as client:
            tasks = [asyncio.create_task(client.verify(body, headers, now=NOW)) for _ in range(20)]
            await asyncio.sleep(0)  # let every task reach the shared fetch
            fake.async_gate.set()
            results = await asyncio.gather(*tasks)
            assert {r.request_id for r in results} == {"req-1"}
            assert client.fetches == 1

    asyncio.run(main())
    assert fake.requests == 1


def test_async_client_policy(keypair: KeyPair, other_keypair: KeyPair, clock: FakeClock) -> None:
    """Async: rotation via refresh, stale on failure, cold failure, rate limit."""
    fake = AsyncFake(keypair)

    async def main() -> None:
        async with fake.async_client(clock, ttl=60, min_refresh_interval=10) as client:
            assert await client.get_keys() == (keypair.public_key,)
            assert await client.refresh() == (keypair.public_key,)  # once, at once
            assert await client.refresh() is None  # then rate-limited
            fake.rotate(keypair, other_keypair)
            clock.advance(10)
            body, headers = _delivery(other_keypair)
            assert (await client.verify(body, headers, now=NOW)).request_id == "req-1"
            fake.status = 503
            clock.advance(61)
            assert len(await client.get_keys()) == 2  # stale
            assert client.fetch_failures == 1
        cold = AsyncFake(keypair)
        cold.error = httpx.ConnectError("refused")
        async with cold.async_client(clock) as client:
            with pytest.raises(KeysUnavailableError):
                await client.get_keys()

    asyncio.run(main())


def test_registry_is_per_url_and_per_loop(keypair: KeyPair) -> None:
    """One sync client per URL; one async client per (URL, loop); one cache per URL."""
    assert get_jwks_client(URL) is get_jwks_client(URL)
    assert get_jwks_client(URL) is not get_jwks_client(URL + "?v=2")

    async def grab() -> AsyncJWKSClient:
        client = get_async_jwks_client(URL)
        assert client is get_async_jwks_client(URL)
        return client

    first, second = asyncio.run(grab()), asyncio.run(grab())
    assert first is not second
    assert first.cache is second.cache is get_jwks_client(URL).cache


def test_real_loopback_server_rotation_and_outage(keypair: KeyPair, other_keypair: KeyPair) -> None:
    """End to end over HTTP: fetch, rotate, outage served stale, outage on cold cache."""
    clock = FakeClock()
    with JWKSServer(keypair) as server, JWKSClient(server.url, clock=clock) as client:
        body, headers = _delivery(keypair)
        assert client.verify(body, headers, now=NOW)
        server.set_keys(other_keypair)
        clock.advance(10)
        body, headers = _delivery(other_keypair)
        assert client.verify(body, headers, now=NOW)
        server.fail(503)
        clock.advance(3600)
        assert client.get_keys() == (other_keypair.public_key,)
        assert server.requests == 3
        with JWKSClient(server.url) as cold, pytest.raises(KeysUnavailableError):
            cold.get_keys()


def test_keys_fetched_after_the_signature_decide_at_once(
    keypair: KeyPair, other_keypair: KeyPair, clock: FakeClock
) -> None:
    """A delivery signed before the keys were fetched: its key would be among them, so no
    key verifying it is final (401 with what to check first), and costs no fetch."""
    fake = FakeJWKS(keypair)
    with fake.client(clock) as client:
        body, headers = _delivery(other_keypair)  # signed at NOW
        for _ in range(3):  # the same answer every time, a second apart
            with pytest.raises(WebhookVerificationError) as info:
                client.verify(body, headers, now=NOW + 30)  # keys fetched 30 s after it
            assert info.value.reason is Reason.INVALID_SIGNATURE
            assert "verify the raw request bytes, not re-serialized JSON" in str(info.value)
            clock.advance(1)
        assert fake.requests == 1  # the first fetch only: no refresh could change it
        fake.status = 503  # an outage changes nothing: the keys it needs are cached
        with pytest.raises(WebhookVerificationError):
            client.verify(body, headers, now=NOW + 30)
        assert fake.requests == 1
        fake.status = 200
        # Within the clock-skew allowance the refresh still runs (a key fal published then).
        body, headers = _delivery(other_keypair, "req-2")
        with pytest.raises(WebhookVerificationError):
            client.verify(body, headers, now=NOW + CLOCK_SKEW_ALLOWANCE)
        assert fake.requests == 2


def test_a_rate_limited_refresh_is_key_refresh_pending(
    keypair: KeyPair, other_keypair: KeyPair, clock: FakeClock
) -> None:
    """Signed after the last fetch, no key verifies, refresh rate-limited: 503 with its own
    reason — not keys_unavailable, which is kept for a JWKS that cannot be fetched."""
    fake = FakeJWKS(keypair)
    with fake.client(clock, min_refresh_interval=10) as client:

        def verdict(second: int) -> VerifyError:
            """A delivery signed by a key not in the JWKS and checked at NOW + second."""
            body, headers = sign_at(other_keypair, NOW + second)
            with pytest.raises(VerifyError) as info:
                client.verify(body, headers, now=NOW + second)
            return info.value

        assert verdict(0).reason is Reason.INVALID_SIGNATURE  # fetch, refresh at once: final
        clock.advance(1)
        pending = verdict(1)
        assert isinstance(pending, KeyRefreshPendingError)
        assert pending.reason is Reason.KEY_REFRESH_PENDING
        assert "retry shortly" in str(pending) and "raw request bytes" in str(pending)
        assert fake.requests == 2
        # The interval passed and the JWKS is down: that is keys_unavailable, named.
        fake.status = 503
        clock.advance(10)
        down = verdict(11)
        assert down.reason is Reason.KEYS_UNAVAILABLE and "HTTP 503" in str(down)
        # Still down, now rate-limited too: the outage, not a pending refresh, is the cause.
        clock.advance(1)
        assert verdict(12).reason is Reason.KEYS_UNAVAILABLE


def test_async_client_verdicts(keypair: KeyPair, other_keypair: KeyPair, clock: FakeClock) -> None:
    """The async client reaches the same verdicts through the shared base."""
    fake = AsyncFake(keypair)

    async def main() -> None:
        async with fake.async_client(clock, min_refresh_interval=10) as client:
            body, headers = _delivery(other_keypair)
            with pytest.raises(WebhookVerificationError) as info:
                await client.verify(body, headers, now=NOW + 30)
            assert "raw request bytes" in str(info.value)
            assert fake.requests == 1  # signed before the fetch: decided without a refresh
            body, headers = sign_at(other_keypair, NOW + 30)
            with pytest.raises(WebhookVerificationError):
                await client.verify(body, headers, now=NOW + 30)  # refreshed once at once
            clock.advance(1)
            body, headers = sign_at(other_keypair, NOW + 31)
            with pytest.raises(KeyRefreshPendingError):
                await client.verify(body, headers, now=NOW + 31)
            assert fake.requests == 2

    asyncio.run(main())
