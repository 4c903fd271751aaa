"""Ed25519 public keys: parsing JWKs / JWKS documents and static key sources.

A `PublicKey` is validated when it is built, so verification never meets a bad key.
`parse_jwks` skips individual keys it cannot use (another algorithm, a bad ``x``) and
fails only when nothing usable is left: a JWKS with zero Ed25519 keys is treated as
invalid, exactly like an unreachable one.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from falhook.verify.errors import KeysUnavailableError

__all__ = ["KeysLike", "PublicKey", "load_keys", "parse_jwks"]

MAX_KEYS = 64  # in one JWKS document
_KEY_BYTES = 32
_SIGNATURE_BYTES = 64


def b64url_encode(raw: bytes) -> str:
    """Unpadded base64url, as JWKs spell their values."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_decode(text: object) -> bytes:
    """Decode base64url with or without ``=`` padding (fal's padding is undocumented)."""
    if not isinstance(text, str) or not text.isascii():
        raise ValueError("x must be an ASCII base64url string")
    stripped = text.rstrip("=")
    if len(text) - len(stripped) > 2:
        raise ValueError("too much padding in x")
    try:
        # validate=True rejects characters outside the alphabet instead of dropping them.
        return base64.b64decode(
            stripped + "=" * (-len(stripped) % 4), altchars=b"-_", validate=True
        )
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"x is not base64url: {exc}") from exc


class PublicKey:
    """An Ed25519 public key able to check fal webhook signatures.

    Equality is constant-time over the raw key bytes; ``kid`` is informational (fal's
    signature header carries no key id, so every key is tried).
    """

    __slots__ = ("_raw", "kid")

    def __init__(self, raw: bytes, *, kid: str | None = None) -> None:
        if not isinstance(raw, bytes | bytearray | memoryview):
            raise TypeError("an Ed25519 public key is bytes")
        raw = bytes(raw)
        if len(raw) != _KEY_BYTES:
            raise ValueError(f"an Ed25519 public key is {_KEY_BYTES} bytes, got {len(raw)}")
        VerifyKey(raw)  # PyNaCl's own validation of the key bytes; the object is not kept
        self._raw = raw
        self.kid = kid

    @classmethod
    def from_bytes(cls, raw: bytes, *, kid: str | None = None) -> PublicKey:
        """Build from the 32 raw key bytes; raises ValueError for any other length."""
        return cls(raw, kid=kid)

    @classmethod
    def from_base64url(cls, text: str, *, kid: str | None = None) -> PublicKey:
        """Build from base64url text, padded or not; raises ValueError if it is not a key."""
        return cls(b64url_decode(text), kid=kid)

    @classmethod
    def from_jwk(cls, jwk: Mapping[str, Any]) -> PublicKey:
        """Build from one JWK (``kty`` OKP, ``crv`` Ed25519, ``x``); raises ValueError if unusable.

        ``kty`` and ``crv`` may be absent (fal documents only ``x``) but, when present,
        must name Ed25519.
        """
        if not isinstance(jwk, Mapping):
            raise ValueError("a JWK is a JSON object")
        if jwk.get("kty", "OKP") != "OKP":
            raise ValueError(f"unsupported kty {jwk.get('kty')!r}")
        if jwk.get("crv", "Ed25519") != "Ed25519":
            raise ValueError(f"unsupported crv {jwk.get('crv')!r}")
        kid = jwk.get("kid")
        return cls(b64url_decode(jwk.get("x")), kid=kid if isinstance(kid, str) else None)

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True when ``signature`` (64 bytes) signs ``message``; never raises for bad input."""
        # The libsodium binding directly, not VerifyKey.verify: the same check without the
        # Python-level argument handling, on the hot path (bench/README). The length check
        # is ours.
        if len(signature) != _SIGNATURE_BYTES:
            return False
        try:
            crypto_sign_open(signature + message, self._raw)
        except (BadSignatureError, ValueError, TypeError):
            return False
        return True

    def __bytes__(self) -> bytes:
        return self._raw

    def to_base64url(self) -> str:
        """The key as unpadded base64url, as in a JWK's ``x``."""
        return b64url_encode(self._raw)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PublicKey):
            return NotImplemented
        return hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"PublicKey({self.to_base64url()!r}, kid={self.kid!r})"


def parse_jwks(document: Mapping[str, Any] | str | bytes) -> tuple[PublicKey, ...]:
    """Parse a JWKS document into its usable Ed25519 keys.

    Unusable individual keys are skipped. Raises `KeysUnavailableError` when the document
    is not a JWKS or has no usable key.
    """
    if isinstance(document, str | bytes | bytearray):
        try:
            document = json.loads(document)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise KeysUnavailableError(f"JWKS is not valid JSON: {exc}") from exc
    if not isinstance(document, Mapping):
        raise KeysUnavailableError("JWKS is not a JSON object")
    entries = document.get("keys")
    if not isinstance(entries, list):
        raise KeysUnavailableError('JWKS has no "keys" list')
    if len(entries) > MAX_KEYS:
        # A key set is a handful of keys (fal's: one or two, more while rotating). Every
        # delivery whose key is not found is tried against each, on the event loop.
        raise KeysUnavailableError(f"JWKS lists {len(entries)} keys; over {MAX_KEYS} is refused")
    keys: list[PublicKey] = []
    for entry in entries:
        try:
            key = PublicKey.from_jwk(entry)
        except (ValueError, TypeError):
            continue  # one bad key must not take the whole set down
        if key not in keys:
            keys.append(key)
    if not keys:
        raise KeysUnavailableError("JWKS has no usable Ed25519 key")
    return tuple(keys)


KeysLike: TypeAlias = (
    Mapping[str, Any] | str | bytes | os.PathLike[str] | PublicKey | Sequence[PublicKey | bytes]
)
"""Static key sources accepted by `load_keys` and ``verify_signature(keys=...)``."""


def load_keys(source: KeysLike) -> tuple[PublicKey, ...]:
    """Turn any `KeysLike` into a tuple of keys; raises `KeysUnavailableError` if none.

    A str is JSON when it starts with ``{`` and a file path otherwise; bytes are JSON.
    """
    if isinstance(source, PublicKey):
        return (source,)
    if isinstance(source, Mapping):
        return parse_jwks(source)
    if isinstance(source, bytes | bytearray):
        return parse_jwks(bytes(source))
    if isinstance(source, str) and source.lstrip().startswith("{"):
        return parse_jwks(source)
    if isinstance(source, str | os.PathLike):
        try:
            text = Path(source).read_bytes()
        except OSError as exc:
            raise KeysUnavailableError(f"cannot read keys file {source!s}: {exc}") from exc
        return parse_jwks(text)
    if isinstance(source, Sequence):
        keys: list[PublicKey] = []
        for item in source:
            if isinstance(item, PublicKey):
                keys.append(item)
                continue
            if not isinstance(item, bytes | bytearray | memoryview):
                raise KeysUnavailableError(f"invalid static key of type {type(item).__name__}")
            try:
                keys.append(PublicKey(bytes(item)))
            except ValueError as exc:
                raise KeysUnavailableError(f"invalid static key: {exc}") from exc
        if not keys:
            raise KeysUnavailableError("no keys given")
        return tuple(keys)
    raise KeysUnavailableError(f"unsupported keys source: {type(source).__name__}")


def load_jwks_file(path: Path) -> tuple[PublicKey, ...]:
    """The keys of a local JWKS file; KeysUnavailableError naming the file if unusable."""
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise KeysUnavailableError(f"JWKS file not found: {path}") from None
    except OSError as exc:
        raise KeysUnavailableError(f"cannot read JWKS file {path}: {exc.strerror or exc}") from exc
    try:
        return parse_jwks(text)
    except KeysUnavailableError as exc:
        raise KeysUnavailableError(f"JWKS file {path}: {exc}") from exc
