"""The checks before the crypto, and the signed message: what every verifier shares.

fal signs ``UTF8(request_id + "\\n" + user_id + "\\n" + timestamp + "\\n" +
sha256(raw_body).hexdigest())`` with Ed25519 and sends the 64-byte signature as 128 hex
characters; the header carries no key id, so every key is tried. Checks run cheapest
first: headers present → formats → timestamp tolerance → user pin → crypto. What the
headers alone decide (`check_headers`) can run before the body is read.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from falhook.verify._headers import HeadersLike, extract, parse_signature, parse_timestamp
from falhook.verify.errors import Reason, WebhookVerificationError

if TYPE_CHECKING:  # keys.py loads PyNaCl, which checking headers never needs
    from falhook.verify.keys import PublicKey

__all__ = [
    "DEFAULT_JWKS_URL",
    "DEFAULT_TOLERANCE",
    "INVALID_SIGNATURE_MESSAGE",
    "Prepared",
    "VerifiedWebhook",
    "WebhookHeaders",
    "check",
    "check_headers",
    "check_tolerance",
    "default_jwks_url",
    "first_match",
    "no_key_verifies",
    "prepare",
    "prepare_body",
]

DEFAULT_JWKS_URL = "https://rest.fal.ai/.well-known/jwks.json"
DEFAULT_TOLERANCE = 300.0


@dataclass(frozen=True, slots=True)
class VerifiedWebhook:
    """What an authentic delivery proved: its signed request id, user id and timestamp."""

    request_id: str
    user_id: str
    timestamp: int


# (message, signature, result): a delivery that passed every check but the crypto. A plain
# tuple rather than a NamedTuple: it is built on every call and never leaves the package.
Prepared: TypeAlias = tuple[bytes, bytes, VerifiedWebhook]


def _env_user_id() -> str | None:
    """``FALHOOK_USER_ID``, read on every call (tests and operators may change it)."""
    return os.environ.get("FALHOOK_USER_ID")


def default_jwks_url() -> str:
    """``FALHOOK_JWKS_URL`` if set and non-empty, else fal's JWKS URL (read at call time)."""
    return os.environ.get("FALHOOK_JWKS_URL") or DEFAULT_JWKS_URL


@dataclass(frozen=True, slots=True)
class WebhookHeaders:
    """fal's four headers, checked as far as headers alone allow (see `check_headers`)."""

    request_id: str
    user_id: str
    timestamp: int
    timestamp_text: str  # verbatim: the signed message holds the header as sent
    signature: bytes


def check_headers(
    headers: HeadersLike,
    *,
    user_id: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> WebhookHeaders:
    """Run every check that needs no body and no key: presence, formats, timestamp
    tolerance and the user pin. A server can call it before reading the body and refuse
    an inauthentic request without buffering a byte of it.

    Arguments are those of `verify_signature`.

    :raises WebhookVerificationError: the headers alone prove the delivery inauthentic.
    """
    if tolerance != DEFAULT_TOLERANCE:
        check_tolerance(tolerance)
    request_id, header_user, ts_text, sig_text = extract(headers)
    timestamp = parse_timestamp(ts_text)
    signature = parse_signature(sig_text)
    # Whole seconds, like fal's reference `abs(int(time.time()) - ts) > 300`.
    current = int(time.time() if now is None else now)
    if current - timestamp > tolerance:
        raise WebhookVerificationError(
            Reason.TIMESTAMP_TOO_OLD,
            f"timestamp {timestamp} is {current - timestamp} s old (tolerance {tolerance:g} s)",
        )
    if timestamp - current > tolerance:
        raise WebhookVerificationError(
            Reason.TIMESTAMP_TOO_NEW,
            f"timestamp {timestamp} is {timestamp - current} s ahead (tolerance {tolerance:g} s)",
        )
    pinned = _env_user_id() if user_id is None else user_id
    if pinned and header_user != pinned:
        raise WebhookVerificationError(
            Reason.USER_MISMATCH, "delivery is for another fal user", header=None
        )
    return WebhookHeaders(request_id, header_user, timestamp, ts_text, signature)


def prepare_body(checked: WebhookHeaders, body: bytes) -> Prepared:
    """Build the signed message for headers `check_headers` passed (internal)."""
    try:
        message = (
            f"{checked.request_id}\n{checked.user_id}\n{checked.timestamp_text}\n"
            f"{hashlib.sha256(body).hexdigest()}"
        ).encode()
    except UnicodeEncodeError:  # lone surrogates in a str header value
        raise WebhookVerificationError(
            Reason.MALFORMED_HEADER, "header value is not encodable as UTF-8"
        ) from None
    result = VerifiedWebhook(checked.request_id, checked.user_id, checked.timestamp)
    return message, checked.signature, result


def prepare(
    body: bytes,
    headers: HeadersLike,
    *,
    user_id: str | None,
    tolerance: float,
    now: float | None,
) -> Prepared:
    """Run the non-crypto checks and build the signed message (internal)."""
    if body.__class__ is not bytes and not isinstance(body, bytes | bytearray | memoryview):
        raise TypeError(f"body must be the raw request bytes, not {type(body).__name__}")
    return prepare_body(check_headers(headers, user_id=user_id, tolerance=tolerance, now=now), body)


def first_match(prepared: Prepared, keys: Iterable[PublicKey]) -> VerifiedWebhook | None:
    """The result if any of ``keys`` verifies the signature, else None (internal)."""
    message, signature, result = prepared
    for key in keys:
        if key.verify(message, signature):
            return result
    return None


INVALID_SIGNATURE_MESSAGE = (
    "no key verifies the signature; check first that you verify the raw request bytes, "
    "not re-serialized JSON"
)


def no_key_verifies() -> WebhookVerificationError:
    """The error for a signature no key verifies. Its message names the usual cause: a body
    parsed and written again (``json.dumps(json.loads(body))``) is other bytes."""
    return WebhookVerificationError(Reason.INVALID_SIGNATURE, INVALID_SIGNATURE_MESSAGE)


def check(prepared: Prepared, keys: Iterable[PublicKey]) -> VerifiedWebhook:
    """Return the result when any key verifies, else raise ``invalid_signature`` (internal)."""
    result = first_match(prepared, keys)
    if result is None:
        raise no_key_verifies()
    return result


def check_tolerance(tolerance: float) -> None:
    """Raise ValueError unless `tolerance` is a non-negative number of seconds."""
    if not tolerance >= 0:  # also rejects NaN
        raise ValueError("tolerance must be a non-negative number of seconds")
