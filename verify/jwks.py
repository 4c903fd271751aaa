"""Fetching and caching fal's JWKS.

`KeyCache` holds the policy and no I/O: a TTL (clamped to fal's 24 h maximum), a minimum
interval between fetches, stale keys served when a refresh fails. `JWKSClient` and
`AsyncJWKSClient` share a base that holds the settings and every decision; they differ only
in how they call httpx and how concurrent callers share one in-flight fetch (a
`threading.Lock` vs a shared task).

When no cached key verifies a signature:

- if the keys were fetched after the delivery was signed (by more than
  `CLOCK_SKEW_ALLOWANCE`), the key fal signed with was already published and among them:
  ``invalid_signature`` at once, with no fetch;
- else the client refreshes — at once after a regular fetch, then at most once per
  ``min_refresh_interval`` — and retries: a rotated key is picked up at once, while a flood
  of forged signatures costs one fetch per interval. While a refresh is rate-limited, the
  verdict waits: `KeyRefreshPendingError` (``key_refresh_pending``, answer 503: it may be a
  key published since); while the JWKS cannot be fetched, `KeysUnavailableError`
  (``keys_unavailable``, 503). The cold cache is rate-limited too.

A fetch has a total deadline (``timeout``) and a size cap (`MAX_JWKS_BYTES`); the async
client parses the keys in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Generic, TypeVar

import httpx

from falhook.verify._headers import HeadersLike
from falhook.verify.errors import KeyRefreshPendingError, KeysUnavailableError
from falhook.verify.keys import PublicKey, parse_jwks
from falhook.verify.message import (
    DEFAULT_TOLERANCE,
    Prepared,
    VerifiedWebhook,
    WebhookHeaders,
    first_match,
    no_key_verifies,
    prepare,
    prepare_body,
)

__all__ = [
    "CLOCK_SKEW_ALLOWANCE",
    "DEFAULT_FETCH_TIMEOUT",
    "MAX_JWKS_BYTES",
    "MAX_TTL",
    "AsyncJWKSClient",
    "JWKSClient",
    "KeyCache",
    "get_async_jwks_client",
    "get_jwks_client",
]

logger = logging.getLogger("falhook.verify.jwks")

MAX_TTL = 24 * 3600.0
"""fal: "Do not cache longer than 24 hours since they can change"."""

MAX_JWKS_BYTES = 1024 * 1024
"""A JWKS answer over this is refused unread (fal's is well under 2 KB)."""

DEFAULT_FETCH_TIMEOUT = 5.0
"""Seconds for a whole fetch (connect to last byte), well inside fal's 15 s per delivery."""

CLOCK_SKEW_ALLOWANCE = 5.0
"""Seconds by which keys must have been fetched after a delivery's signed timestamp for
"no key verifies" to be final at once: the timestamp is whole seconds, and fal's clock and
ours may differ a little."""

# The errors a fetch can end in; anything else is a bug and propagates.
_FETCH_ERRORS = (httpx.HTTPError, httpx.InvalidURL, KeysUnavailableError, OSError)

Keys = tuple[PublicKey, ...]
_Http = TypeVar("_Http", httpx.Client, httpx.AsyncClient)


class KeyCache:
    """The key-caching policy shared by both clients; pure state, no I/O, no locking.

    Counters: ``fetches`` (attempts started) and ``fetch_failures``.
    """

    def __init__(
        self,
        *,
        ttl: float = 3600,
        min_refresh_interval: float = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not ttl > 0:
            raise ValueError("ttl must be positive")
        if not min_refresh_interval >= 0:
            raise ValueError("min_refresh_interval must be non-negative")
        self.ttl = min(float(ttl), MAX_TTL)
        self.min_refresh_interval = float(min_refresh_interval)
        self.clock = clock
        self.keys: Keys | None = None
        self.expires_at = -math.inf
        self.last_attempt: float | None = None
        self.fetched_at: float | None = None  # (clock) when the cached keys' fetch began
        self.last_refresh = False  # the last fetch was forced by an unverified signature
        self.last_ok = False
        self.last_error: str | None = None
        self.generation = 0  # bumped when an attempt ends; lets waiters see "someone fetched"
        self.fetches = 0
        self.fetch_failures = 0

    def fresh(self) -> Keys | None:
        """The keys if cached and within the TTL, else None (the hot path: one clock read)."""
        keys = self.keys
        if keys is not None and self.clock() < self.expires_at:
            return keys
        return None

    def fetch_allowed(self, now: float) -> bool:
        """Whether the minimum interval since the last attempt has passed."""
        last = self.last_attempt
        return last is None or now - last >= self.min_refresh_interval

    def refresh_allowed(self, now: float) -> bool:
        """A forced refresh (no cached key verifies): allowed once right after a regular
        fetch — a key rotated since is picked up at once — then at most once per
        interval, so a forged flood costs one fetch per interval. A cold cache has nothing
        to refresh: `needs_fetch` rate-limits it."""
        return self.fetch_allowed(now) or (self.keys is not None and not self.last_refresh)

    def needs_fetch(self, now: float) -> bool:
        """Cold or expired, unless an attempt was made very recently."""
        if self.keys is not None and now < self.expires_at:
            return False
        return self.fetch_allowed(now)

    def fetched_after(self, timestamp: float, now: float) -> bool:
        """Whether the cached keys were fetched more than `CLOCK_SKEW_ALLOWANCE` after the
        Unix time ``timestamp`` (``now``: the current Unix time). Ages are compared, so the
        cache's own clock may be monotonic."""
        fetched = self.fetched_at
        if fetched is None or self.keys is None:
            return False
        return (now - timestamp) - (self.clock() - fetched) > CLOCK_SKEW_ALLOWANCE

    def begin(self, now: float, *, refresh: bool = False) -> None:
        """Record that a fetch starts now (`refresh`: forced by a signature no key verifies)."""
        self.last_attempt = now
        self.last_refresh = refresh
        self.fetches += 1

    def succeed(self, keys: Keys, now: float) -> None:
        """Record fetched keys, fresh for ``ttl`` from ``now``."""
        self.keys = keys
        self.expires_at = now + self.ttl
        self.fetched_at = self.last_attempt
        self.last_ok = True
        self.last_error = None
        self.generation += 1

    def fail(self, error: str, url: str) -> None:
        """Record a failed fetch; cached keys stay in service."""
        self.fetch_failures += 1
        self.last_ok = False
        self.last_error = error
        self.generation += 1
        if self.keys is not None:
            logger.warning("JWKS refresh from %s failed, serving cached keys: %s", url, error)
        else:
            logger.warning("JWKS fetch from %s failed and no keys are cached: %s", url, error)

    def require(self, url: str) -> Keys:
        """The cached keys, fresh or stale; `KeysUnavailableError` on a cold cache."""
        if self.keys is None:
            raise KeysUnavailableError(
                f"no verification keys from {url}: {self.last_error or 'not fetched'}"
            )
        return self.keys

    def refreshed(self, url: str) -> Keys | None:
        """refresh()'s answer after an attempt ended: new keys, None, or cold failure."""
        if self.last_ok:
            return self.keys
        self.require(url)
        return None


def _too_large(size: int | str) -> KeysUnavailableError:
    return KeysUnavailableError(f"JWKS answer of {size} bytes is over {MAX_JWKS_BYTES} bytes")


def _fetch_error(exc: BaseException) -> str:
    """What went wrong, in one line: httpx's status errors add a line of advice (a link to
    MDN), and the reason is logged and shown as one line by `falhook verify`."""
    if isinstance(exc, httpx.HTTPStatusError):
        response = exc.response
        return f"HTTP {response.status_code} {response.reason_phrase}".rstrip()
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# Asked uncompressed: the size cap then bounds memory too. httpx would inflate a whole
# compressed chunk (a 200 KB gzip of zeros is 200 MB) before the cap saw its size.
_IDENTITY = {"Accept-Encoding": "identity"}


def _check_head(response: httpx.Response) -> None:
    """Refuse an answer its headers already show unusable: compressed, or declared too big."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise KeysUnavailableError(
            f"JWKS answer is compressed ({encoding}) though it was asked for uncompressed"
        )
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_JWKS_BYTES:
        raise _too_large(declared)


class _Capped:
    """A JWKS body read in chunks, refused once over `MAX_JWKS_BYTES`, within a deadline."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.chunks: list[bytes] = []
        self.size = 0

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > MAX_JWKS_BYTES:
            raise _too_large(f"over {self.size}")
        if time.monotonic() > self.deadline:
            raise TimeoutError
        self.chunks.append(chunk)

    def content(self) -> bytes:
        return b"".join(self.chunks)


class _BaseJWKSClient(Generic[_Http]):
    """What both clients share: the settings, the cache and every decision; the two
    subclasses add only the I/O (httpx's sync or async client, a lock or a shared task)."""

    def __init__(
        self,
        url: str,
        *,
        http_client: _Http | None = None,
        ttl: float = 3600,
        min_refresh_interval: float = 10,
        timeout: float = DEFAULT_FETCH_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
        cache: KeyCache | None = None,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.cache = cache or KeyCache(
            ttl=ttl, min_refresh_interval=min_refresh_interval, clock=clock
        )
        self._http: _Http | None = http_client
        self._owns_http = http_client is None
        self._init_io()

    def _init_io(self) -> None:
        """Set up what the subclass needs to share one fetch among concurrent callers."""

    @property
    def fetches(self) -> int:
        """Fetch attempts so far."""
        return self.cache.fetches

    @property
    def fetch_failures(self) -> int:
        """Failed fetch attempts so far."""
        return self.cache.fetch_failures

    @contextlib.contextmanager
    def _recording(self, refresh: bool) -> Iterator[None]:
        """Around one fetch: record its start, and its failure in one line (a fetch ends in
        `KeyCache.succeed` inside the block)."""
        cache = self.cache
        cache.begin(cache.clock(), refresh=refresh)
        try:
            yield
        except TimeoutError:
            cache.fail(f"no complete answer within {self.timeout:g} s", self.url)
        except _FETCH_ERRORS as exc:
            cache.fail(_fetch_error(exc), self.url)

    def _settled(self, prepared: Prepared, now: float | None) -> None:
        """Raise ``invalid_signature`` when no refresh could change the verdict: the cached
        keys were fetched after the delivery was signed, so its key was already among them."""
        signed = prepared[2].timestamp
        if self.cache.fetched_after(signed, time.time() if now is None else now):
            raise no_key_verifies()

    def _after_refresh(self, prepared: Prepared, old: Keys, new: Keys | None) -> VerifiedWebhook:
        """The verdict once `refresh` answered ``new`` for a signature no key in ``old``
        verifies."""
        if new is None:
            raise self._undecided()
        result = first_match(prepared, (k for k in new if k not in old))
        if result is None:
            raise no_key_verifies()
        return result

    def _undecided(self) -> KeysUnavailableError:
        """No fresh key set to decide with: the signer may hold a key published since the
        last fetch, so "not authentic" cannot be said yet (503, and fal retries)."""
        cache = self.cache
        if not cache.last_ok:
            return KeysUnavailableError(
                "no cached key verifies the signature and the keys cannot be fetched from "
                f"{self.url}: {cache.last_error}"
            )
        return KeyRefreshPendingError(
            "no cached key verifies the signature, and the keys were fetched less than "
            f"{cache.min_refresh_interval:g} s ago: retry shortly, in case the key is new; "
            "if every delivery gets this, verify the raw request bytes, not re-serialized JSON"
        )


class JWKSClient(_BaseJWKSClient[httpx.Client]):
    """Keys from a JWKS URL, cached per `KeyCache` rules; thread-safe."""

    def _init_io(self) -> None:
        self._lock = threading.Lock()

    def _fetch(self, *, refresh: bool = False) -> None:
        # Called with the lock held.
        if self._http is None:
            self._http = httpx.Client(follow_redirects=True)
        # httpx's timeout is per read: the deadline is checked between chunks, so a
        # source that drips bytes is given up on at most one read past it.
        body = _Capped(time.monotonic() + self.timeout)
        with self._recording(refresh):
            with self._http.stream(
                "GET", self.url, headers=_IDENTITY, timeout=self.timeout
            ) as response:
                response.raise_for_status()
                _check_head(response)
                for chunk in response.iter_bytes():
                    body.add(chunk)
            self.cache.succeed(parse_jwks(body.content()), self.cache.clock())

    def get_keys(self) -> Keys:
        """The current keys, fetching when cold or expired; stale keys if a refresh fails.

        :raises KeysUnavailableError: nothing cached and the fetch failed.
        """
        cache = self.cache
        keys = cache.fresh()
        if keys is not None:
            return keys
        seen = cache.generation
        with self._lock:
            # Another thread finished a fetch while we waited: share its outcome.
            if cache.generation == seen and cache.needs_fetch(cache.clock()):
                self._fetch()
            return cache.require(self.url)

    def refresh(self) -> Keys | None:
        """Fetch now unless one ran less than ``min_refresh_interval`` ago.

        Returns the new keys, or None when rate-limited or when the fetch failed and cached
        keys remain. :raises KeysUnavailableError: the cache is cold and the fetch failed
        or is rate-limited.
        """
        cache = self.cache
        seen = cache.generation
        with self._lock:
            if cache.generation == seen:
                if not cache.refresh_allowed(cache.clock()):
                    cache.require(self.url)  # a cold cache has nothing to fall back on
                    return None
                self._fetch(refresh=True)
            return cache.refreshed(self.url)

    def check(self, prepared: Prepared, now: float | None = None) -> VerifiedWebhook:
        """Crypto step of `verify` for an already prepared delivery (internal); ``now`` is
        the Unix time the delivery's timestamp was checked against."""
        keys = self.cache.fresh() or self.get_keys()
        result = first_match(prepared, keys)
        if result is None:
            self._settled(prepared, now)
            result = self._after_refresh(prepared, keys, self.refresh())
        return result

    def verify(
        self,
        body: bytes,
        headers: HeadersLike,
        *,
        user_id: str | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
        now: float | None = None,
    ) -> VerifiedWebhook:
        """`verify_signature` against this client's keys."""
        prepared = prepare(body, headers, user_id=user_id, tolerance=tolerance, now=now)
        return self.check(prepared, now)

    def verify_body(self, body: bytes, checked: WebhookHeaders) -> VerifiedWebhook:
        """Verify ``body`` against headers `check_headers` passed, with this client's keys."""
        return self.check(prepare_body(checked, body))

    def close(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_http and self._http is not None:
            self._http.close()
            self._http = None

    def __enter__(self) -> JWKSClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncJWKSClient(_BaseJWKSClient[httpx.AsyncClient]):
    """`JWKSClient` for asyncio: concurrent callers await one shared fetch task.

    Use one instance per event loop (`get_async_jwks_client` does); the `KeyCache` may be
    shared across loops.
    """

    def _init_io(self) -> None:
        self._inflight: asyncio.Task[None] | None = None

    async def _fetch(self, refresh: bool) -> None:
        try:
            if self._http is None:
                self._http = httpx.AsyncClient(follow_redirects=True)
            body = _Capped(math.inf)  # the deadline is the asyncio.timeout around it all
            with self._recording(refresh):
                async with asyncio.timeout(self.timeout):
                    async with self._http.stream(
                        "GET", self.url, headers=_IDENTITY, timeout=self.timeout
                    ) as r:
                        r.raise_for_status()
                        _check_head(r)
                        async for chunk in r.aiter_bytes():
                            body.add(chunk)
                # Off the loop: a big key set would stall every acknowledgement meanwhile.
                keys = await asyncio.to_thread(parse_jwks, body.content())
                self.cache.succeed(keys, self.cache.clock())
        finally:
            self._inflight = None

    async def _shared_fetch(self, *, refresh: bool = False) -> None:
        task = self._inflight
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch(refresh))
            self._inflight = task
        # shield: a cancelled caller must not cancel the fetch others are waiting on.
        await asyncio.shield(task)

    async def get_keys(self) -> Keys:
        """Async twin of `JWKSClient.get_keys`."""
        cache = self.cache
        keys = cache.fresh()
        if keys is not None:
            return keys
        if self._inflight is not None or cache.needs_fetch(cache.clock()):
            await self._shared_fetch()
        return cache.require(self.url)

    async def refresh(self) -> Keys | None:
        """Async twin of `JWKSClient.refresh`."""
        cache = self.cache
        if self._inflight is None and not cache.refresh_allowed(cache.clock()):
            cache.require(self.url)  # a cold cache has nothing to fall back on
            return None
        await self._shared_fetch(refresh=True)
        return cache.refreshed(self.url)

    async def check(self, prepared: Prepared, now: float | None = None) -> VerifiedWebhook:
        """Async twin of `JWKSClient.check`."""
        keys = self.cache.fresh() or await self.get_keys()
        result = first_match(prepared, keys)
        if result is None:
            self._settled(prepared, now)
            result = self._after_refresh(prepared, keys, await self.refresh())
        return result

    async def verify(
        self,
        body: bytes,
        headers: HeadersLike,
        *,
        user_id: str | None = None,
        tolerance: float = DEFAULT_TOLERANCE,
        now: float | None = None,
    ) -> VerifiedWebhook:
        """`verify_signature_async` against this client's keys."""
        prepared = prepare(body, headers, user_id=user_id, tolerance=tolerance, now=now)
        return await self.check(prepared, now)

    async def verify_body(self, body: bytes, checked: WebhookHeaders) -> VerifiedWebhook:
        """Verify ``body`` against headers `check_headers` passed, with this client's keys."""
        return await self.check(prepare_body(checked, body))

    async def aclose(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_http and self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> AsyncJWKSClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


# Process-wide registry: one KeyCache per URL, shared by the sync client and the async
# client of every event loop, so a process fetches each JWKS once per TTL.
_registry_lock = threading.Lock()
_caches: dict[str, KeyCache] = {}
_sync_clients: dict[str, JWKSClient] = {}
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, AsyncJWKSClient]] = (
    weakref.WeakKeyDictionary()
)


def _cache_for(url: str) -> KeyCache:
    cache = _caches.get(url)
    if cache is None:
        cache = _caches[url] = KeyCache()
    return cache


def get_jwks_client(url: str) -> JWKSClient:
    """The process-wide `JWKSClient` for ``url`` (created on first use)."""
    client = _sync_clients.get(url)
    if client is None:
        with _registry_lock:
            client = _sync_clients.get(url)
            if client is None:
                client = _sync_clients[url] = JWKSClient(url, cache=_cache_for(url))
    return client


def get_async_jwks_client(url: str) -> AsyncJWKSClient:
    """The `AsyncJWKSClient` for ``url`` in the running event loop (created on first use)."""
    loop = asyncio.get_running_loop()
    clients = _async_clients.get(loop)
    client = None if clients is None else clients.get(url)
    if client is None:
        with _registry_lock:
            clients = _async_clients.setdefault(loop, {})
            client = clients.get(url)
            if client is None:
                client = clients[url] = AsyncJWKSClient(url, cache=_cache_for(url))
    return client


def clear_registry() -> None:
    """Forget every process-wide client and cache, closing sync clients (for tests)."""
    with _registry_lock:
        for client in _sync_clients.values():
            client.close()
        _sync_clients.clear()
        _async_clients.clear()
        _caches.clear()
