"""Verify a fal webhook delivery: `verify_signature` and `verify_signature_async`.

The scheme and the order of the checks are in message.py; keys come from a JWKS
(jwks.py, cached per URL in the process) or are given (`keys=`). A server that checks
the headers before reading the body (`check_headers`) finishes with `verify_body`.
"""

from __future__ import annotations

from pathlib import Path

from falhook.verify._headers import HeadersLike
from falhook.verify.jwks import get_async_jwks_client, get_jwks_client
from falhook.verify.keys import KeysLike, PublicKey, load_jwks_file, load_keys
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
from falhook.verify.sources import jwks_file

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


# Keys of local JWKS files by path, with the file's mtime: read again only when it changes
# (a `falhook keygen --force` is picked up without a restart).
_FILE_CACHE: dict[Path, tuple[int, tuple[PublicKey, ...]]] = {}


def file_keys(path: Path) -> tuple[PublicKey, ...]:
    """The keys of a local JWKS file, cached until the file changes (internal)."""
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = -1  # load_jwks_file says what is wrong
    entry = _FILE_CACHE.get(path)
    if entry is not None and entry[0] == mtime:
        return entry[1]
    keys = load_jwks_file(path)
    _FILE_CACHE[path] = (mtime, keys)
    return keys


def _keys_from_source(source: str) -> tuple[PublicKey, ...] | None:
    """Static keys when `source` is a local file (the receiver's rule), else None."""
    path = jwks_file(source)
    return None if path is None else file_keys(path)


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
        a programming error and raises TypeError). Not JSON parsed and written again:
        ``json.dumps(json.loads(body))`` gives other bytes (so ``invalid_signature``)
        unless the body was laid out as ``json.dumps`` writes it; `falhook.verify.testing`
        says exactly when.
    :param headers: a mapping (any casing) or (name, value) pairs of str or bytes, such as
        an ASGI ``scope["headers"]``.
    :param jwks_url: where to fetch keys (cached per URL in the process); defaults to
        ``FALHOOK_JWKS_URL``, then fal's URL. Anything but an http(s) URL is a local JWKS
        file (a path or ``file://``), read with no network, as ``falhook serve`` does.
        Ignored when ``keys`` is given.
    :param keys: static keys (`KeysLike`); no network is used.
    :param user_id: require this fal user id; defaults to ``FALHOOK_USER_ID`` (unset or
        empty: any user).
    :param tolerance: allowed clock difference in seconds (300 passes, 301 fails).
    :param now: the current Unix time, for tests; defaults to ``time.time()``.
    :raises WebhookVerificationError: the delivery is not authentic (see ``.reason``).
    :raises KeysUnavailableError: no keys could be obtained.
    :raises ValueError: ``jwks_url`` has a scheme other than http, https or file, or
        ``tolerance`` is negative (programming errors, not a delivery's fault).
    """
    if tolerance != DEFAULT_TOLERANCE:
        check_tolerance(tolerance)
    prepared = prepare(body, headers, user_id=user_id, tolerance=tolerance, now=now)
    if keys is not None:
        return check(prepared, static_keys(keys))
    source = jwks_url or default_jwks_url()
    local = _keys_from_source(source)
    if local is not None:
        return check(prepared, local)
    return get_jwks_client(source).check(prepared, now)


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
    source = jwks_url or default_jwks_url()
    local = _keys_from_source(source)
    if local is not None:
        return check(prepared, local)  # a small file, cached: nothing to await
    return await get_async_jwks_client(source).check(prepared, now)


def verify_body(body: bytes, checked: WebhookHeaders, keys: KeysLike) -> VerifiedWebhook:
    """Finish what `check_headers` began: verify ``body`` against those headers with
    static ``keys`` (a JWKS client's ``verify_body`` does the same with its keys).

    :raises WebhookVerificationError: no key verifies the signature.
    :raises KeysUnavailableError: ``keys`` cannot be loaded.
    """
    return check(prepare_body(checked, body), static_keys(keys))
