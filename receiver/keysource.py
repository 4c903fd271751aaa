"""Where the receiver gets fal's public keys: a JWKS URL (cached) or a local JWKS file."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from falhook.verify import (
    AsyncJWKSClient,
    PublicKey,
    VerifiedWebhook,
    WebhookHeaders,
    check_headers,
    verify_body,
)
from falhook.verify.jwks import DEFAULT_FETCH_TIMEOUT
from falhook.verify.keys import load_jwks_file
from falhook.verify.sources import jwks_file

__all__ = ["KeySource"]

HeaderPairs = Iterable[tuple[bytes, bytes]]


class KeySource:
    """Verifies deliveries for the receiver, never blocking the event loop.

    A URL goes through an `AsyncJWKSClient` (TTL cache, stale-on-error, rate-limited
    refresh when no key verifies). A file path (or ``file://`` URL) is read once, on first
    use, so keygen + serve + send work with no network.
    """

    def __init__(
        self,
        jwks: str,
        *,
        user_id: str | None,
        tolerance: float,
        timeout: float = DEFAULT_FETCH_TIMEOUT,
        min_refresh_interval: float = 10.0,
        client: AsyncJWKSClient | None = None,
    ) -> None:
        self.jwks = jwks
        self.user_id = user_id
        self.tolerance = tolerance
        self._path: Path | None = jwks_file(jwks)  # the same rule as verify_signature's
        self._static: tuple[PublicKey, ...] | None = None
        self.client: AsyncJWKSClient | None = None
        if self._path is None:
            self.client = client or AsyncJWKSClient(
                jwks, timeout=timeout, min_refresh_interval=min_refresh_interval
            )

    @property
    def is_file(self) -> bool:
        """True for a local JWKS file (a problem with it cannot fix itself)."""
        return self._path is not None

    def _static_keys(self) -> tuple[PublicKey, ...]:
        if self._static is None:
            assert self._path is not None
            self._static = load_jwks_file(self._path)
        return self._static

    def check_headers(self, headers: HeaderPairs) -> WebhookHeaders:
        """Everything the headers alone decide; raises WebhookVerificationError."""
        # The user id is pinned explicitly (even to None) so the library's own
        # FALHOOK_USER_ID fallback cannot disagree with the receiver's settings.
        return check_headers(headers, user_id=self.user_id or "", tolerance=self.tolerance)

    async def verify(self, body: bytes, checked: WebhookHeaders) -> VerifiedWebhook:
        """Verify a body against headers `check_headers` passed; raises
        WebhookVerificationError or KeysUnavailableError."""
        if self.client is not None:
            return await self.client.verify_body(body, checked)
        return verify_body(body, checked, self._static_keys())

    async def ready(self) -> None:
        """Raise KeysUnavailableError unless keys can be had now (cached keys count)."""
        if self.client is not None:
            await self.client.get_keys()
        else:
            self._static_keys()

    @property
    def fetches(self) -> int:
        return self.client.fetches if self.client is not None else 0

    @property
    def fetch_failures(self) -> int:
        return self.client.fetch_failures if self.client is not None else 0

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
