"""Errors raised by the verify library.

The tree::

    VerifyError                      root of everything this package raises on purpose
    ├── WebhookVerificationError     the delivery is not authentic (a receiver answers 401)
    └── KeysUnavailableError         no keys could be obtained (a receiver answers 503)
        └── KeyRefreshPendingError   no cached key verifies and a refresh is rate-limited (503)

`KeysUnavailableError` is deliberately *not* a `WebhookVerificationError`: an outage of
fal's JWKS (or of our network) says nothing about the sender, so it must never be
answered as "unauthorized" — fal would not retry and the delivery would be lost.
`KeyRefreshPendingError` is one of them with its own reason: the keys were fetched, but
not since the delivery was signed, and may not be fetched again yet (it may carry a key fal
published since); it is not an outage of the JWKS.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "KeyRefreshPendingError",
    "KeysUnavailableError",
    "Reason",
    "VerifyError",
    "WebhookVerificationError",
]


class Reason(StrEnum):
    """Machine-readable reason for a `VerifyError`: why a delivery is not authentic, or
    that it could not be checked yet (`KEYS_UNAVAILABLE`, `KEY_REFRESH_PENDING`)."""

    MISSING_HEADER = "missing_header"
    MALFORMED_HEADER = "malformed_header"
    TIMESTAMP_TOO_OLD = "timestamp_too_old"
    TIMESTAMP_TOO_NEW = "timestamp_too_new"
    USER_MISMATCH = "user_mismatch"
    INVALID_SIGNATURE = "invalid_signature"
    KEYS_UNAVAILABLE = "keys_unavailable"
    KEY_REFRESH_PENDING = "key_refresh_pending"


class VerifyError(Exception):
    """Root of the errors raised by `verify`; `.reason` says which, for machines."""

    reason: Reason

    def __init__(self, message: str | None = None) -> None:
        # The class docstring is the default message, so subclasses need only a docstring.
        super().__init__(message or (type(self).__doc__ or type(self).__name__).strip())


class WebhookVerificationError(VerifyError):
    """The delivery is not authentic."""

    def __init__(self, reason: Reason, message: str | None = None, *, header: str | None = None):
        self.reason = Reason(reason)
        self.header = header
        super().__init__(message or str(self.reason).replace("_", " "))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason.value!r}, message={str(self)!r})"


class KeysUnavailableError(VerifyError):
    """No verification keys could be obtained (JWKS unreachable or invalid on a cold cache)."""

    reason = Reason.KEYS_UNAVAILABLE


class KeyRefreshPendingError(KeysUnavailableError):
    """No cached key verifies the signature, and the keys may not be fetched again yet."""

    reason = Reason.KEY_REFRESH_PENDING
