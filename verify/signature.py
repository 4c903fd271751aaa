"""Verify a fal webhook delivery: `verify_signature` and `verify_signature_async`.

The scheme and the order of the checks are in message.py; keys come from a JWKS
(jwks.py, cached per URL in the process) or are given (`keys=`). A server that checks
the headers before reading the body (`check_headers`) finishes with `verify_body`.
"""

from __future__ import annotations

from falhook.verify._headers import HeadersLike
from falhook.verify.jwks import get_async_jwks_client, get_jwks_client
from falhook.verify.keys import KeysLike, PublicKey, load_keys
from falhook.verify.message import (
    DEFAULT_JWKS_URL,
    DEFAULT_TOLERANCE,
    VerifiedWebhook,
    WebhookHeaders,
    check,
    check_headers,
    check_tolerance,
    default_jwks_url,
    prepare,
    prepare_body,
)

__all__ = [
    "DEFAULT_JWKS_URL",
    "VerifiedWebhook",
    "WebhookHeaders",
    "check_headers",
    "default_jwks_url",
    "verify_body",
    "verify_signature",
    "verify_signature_async",
]

# Parsed static key sources by identity, so a warm `keys=` call never re-parses. The entry
# holds the source itself, which keeps its id from being reused while it is cached.
_STATIC_CACHE: dict[int, tuple[object, tuple[PublicKey, ...]]] = {}
_STATIC_CACHE_MAX = 128


def static_keys(source: KeysLike) -> tuple[PublicKey, ...]:
    """`load_keys` memoized by the identity of ``source`` (internal).

    A dict or list mutated after its first use keeps its first parse: pass a new object.
    """
    entry = _STATIC_CACHE.get(id(source))
    if entry is not None and entry[0] is source:
        return entry[1]
    keys = load_keys(source)
    if len(_STATIC_CACHE) >= _STATIC_CACHE_MAX:
        _STATIC_CACHE.clear()
    _STATIC_CACHE[id(source)] = (source, keys)
    return keys


def verify_signature(
    body: bytes,
    headers: HeadersLike,
    *,
    jwks_url: str | None = None,
    keys: KeysLike | None = None,
    user_id: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> VerifiedWebhook:
    """Verify a fal webhook delivery and return what it proves.

    :param body: the raw request body, exactly as received (bytes-like; anything else is
        a programming error and raises TypeError).
    :param headers: a mapping (any casing) or (name, value) pairs of str or bytes, such as
        an ASGI ``scope["headers"]``.
    :param jwks_url: where to fetch keys (cached per URL in the process); defaults to
        ``FALHOOK_JWKS_URL``, then fal's URL. Ignored when ``keys`` is given.
    :param keys: static keys (`KeysLike`); no network is used.
    :param user_id: require this fal user id; defaults to ``FALHOOK_USER_ID`` (unset or
        empty: any user).
    :param tolerance: allowed clock difference in seconds (300 passes, 301 fails).
    :param now: the current Unix time, for tests; defaults to ``time.time()``.
    :raises WebhookVerificationError: the delivery is not authentic (see ``.reason``).
    :raises KeysUnavailableError: no keys could be obtained.
    """
    if tolerance != DEFAULT_TOLERANCE:
        check_tolerance(tolerance)
    prepared = prepare(body, headers, user_id=user_id, tolerance=tolerance, now=now)
    if keys is not None:
        return check(prepared, static_keys(keys))
    return get_jwks_client(jwks_url or default_jwks_url()).check(prepared)


async def verify_signature_async(
    body: bytes,
    headers: HeadersLike,
    *,
    jwks_url: str | None = None,
    keys: KeysLike | None = None,
    user_id: str | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    now: float | None = None,
) -> VerifiedWebhook:
    """`verify_signature` for event loops: keys are fetched with httpx's async client.

    With a warm key cache nothing is awaited; the signature check runs inline.
    """
    if tolerance != DEFAULT_TOLERANCE:
        check_tolerance(tolerance)
    prepared = prepare(body, headers, user_id=user_id, tolerance=tolerance, now=now)
    if keys is not None:
        return check(prepared, static_keys(keys))
    return await get_async_jwks_client(jwks_url or default_jwks_url()).check(prepared)


def verify_body(body: bytes, checked: WebhookHeaders, keys: KeysLike) -> VerifiedWebhook:
    """Finish what `check_headers` began: verify ``body`` against those headers with
    static ``keys`` (a JWKS client's ``verify_body`` does the same with its keys).

    :raises WebhookVerificationError: no key verifies the signature.
    :raises KeysUnavailableError: ``keys`` cannot be loaded.
    """
    return check(prepare_body(checked, body), static_keys(keys))
