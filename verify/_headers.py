"""Pull fal's four webhook headers out of whatever header container the caller has.

Accepted: any ``Mapping[str, str]`` (a dict in any casing, starlette ``Headers``, httpx
``Headers``) or an iterable of ``(name, value)`` pairs of str or bytes — including a raw
ASGI ``scope["headers"]`` list, which is the receiver's hot path, so it is handled first
and without building an intermediate dict.

Everything about header *values* fails with `WebhookVerificationError`; a header that
appears twice is ambiguous and counts as malformed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeAlias

from falhook.verify.errors import Reason, WebhookVerificationError

__all__ = [
    "REQUEST_ID",
    "SIGNATURE",
    "TIMESTAMP",
    "USER_ID",
    "HeadersLike",
    "extract",
    "parse_signature",
    "parse_timestamp",
]

REQUEST_ID = "X-Fal-Webhook-Request-Id"
USER_ID = "X-Fal-Webhook-User-Id"
TIMESTAMP = "X-Fal-Webhook-Timestamp"
SIGNATURE = "X-Fal-Webhook-Signature"

CANONICAL = (REQUEST_ID, USER_ID, TIMESTAMP, SIGNATURE)
# Lowercase names (str and bytes: distinct dict keys) mapped to their slot in the result,
# precomputed once; raw ASGI names are already lowercase, so one dict hit finds them.
_SLOTS: dict[object, int] = {}
for _i, _name in enumerate(CANONICAL):
    _SLOTS[_name.lower()] = _i
    _SLOTS[_name.lower().encode("ascii")] = _i
# Lengths of the four names: other headers are skipped without lowercasing them.
_NAME_LENGTHS = frozenset(len(name) for name in CANONICAL)

# A timestamp of more than 20 digits is not a time; also bounds int() work on garbage.
_MAX_TIMESTAMP_DIGITS = 20
_SIGNATURE_HEX_CHARS = 128

HeadersLike: TypeAlias = Mapping[str, str] | Iterable[tuple[str | bytes, str | bytes]]


def _malformed(slot: int, why: str) -> WebhookVerificationError:
    name = CANONICAL[slot]
    return WebhookVerificationError(Reason.MALFORMED_HEADER, f"{name}: {why}", header=name)


def _decode(slot: int, value: Any) -> str:
    cls = value.__class__
    if cls is bytes:
        try:
            text: str = value.decode()
        except UnicodeDecodeError:
            raise _malformed(slot, "not valid UTF-8") from None
    elif cls is str or isinstance(value, str):
        text = str(value)
    elif isinstance(value, bytes | bytearray | memoryview):
        try:
            text = bytes(value).decode()
        except UnicodeDecodeError:
            raise _malformed(slot, "not valid UTF-8") from None
    else:
        raise _malformed(slot, f"unexpected value type {cls.__name__}")
    # HTTP field values never hold control characters; a newline inside an id would also
    # let two different header sets produce the same signed message.
    if not text.isprintable():
        raise _malformed(slot, "contains control or non-printable characters")
    return text


def extract(headers: HeadersLike) -> tuple[str, str, str, str]:
    """Return (request_id, user_id, timestamp, signature) as the verbatim header strings.

    Raises `WebhookVerificationError` with ``missing_header`` (``.header`` = canonical
    name) when one is absent or empty, ``malformed_header`` when a value is unusable.
    """
    found: list[Any] = [None, None, None, None]
    kind = headers.__class__
    if kind is list:  # ASGI scope["headers"]: skip the (slow) ABC checks below
        pairs: Iterable[Any] = headers
    elif kind is dict or isinstance(headers, Mapping):
        pairs = headers.items()  # type: ignore[union-attr]
    elif isinstance(headers, str | bytes):
        raise TypeError("headers must be a mapping or an iterable of (name, value) pairs")
    else:
        pairs = headers
    slots = _SLOTS
    lengths = _NAME_LENGTHS
    try:
        for name, value in pairs:
            slot = slots.get(name)
            if slot is None:
                if len(name) not in lengths or not isinstance(name, str | bytes):
                    continue
                slot = slots.get(name.lower())
                if slot is None:
                    continue
            if found[slot] is not None:
                raise _malformed(slot, "header appears more than once")
            found[slot] = value
    except (TypeError, ValueError) as exc:
        # An iterable that does not yield pairs is a programmer error, not bad input.
        raise TypeError("headers must be a mapping or an iterable of (name, value) pairs") from exc
    # Hot path: four non-empty bytes values (ASGI) or str values (dicts) that decode and
    # print cleanly. Anything else takes the careful path below for the right error.
    a, b, c, d = found
    cls = a.__class__
    if cls is b.__class__ is c.__class__ is d.__class__ and a and b and c and d:
        if cls is bytes:
            try:
                a, b, c, d = a.decode(), b.decode(), c.decode(), d.decode()
            except UnicodeDecodeError:
                a = None  # fall through to the careful path
            else:
                cls = str
        # The timestamp and signature parsers accept only ASCII digits / hex themselves.
        if cls is str and a.isprintable() and b.isprintable():
            return a, b, c, d
        a, b, c, d = found
    # Presence of all four first, then formats: the cheap, most telling check wins.
    for slot in range(4):
        value = found[slot]
        if value is None or value == "" or value == b"":
            name = CANONICAL[slot]
            raise WebhookVerificationError(
                Reason.MISSING_HEADER, f"{name} is missing or empty", header=name
            )
    return (
        _decode(0, found[0]),
        _decode(1, found[1]),
        _decode(2, found[2]),
        _decode(3, found[3]),
    )


def parse_timestamp(text: str) -> int:
    """Parse the timestamp header: ASCII digits only (no sign, spaces or underscores)."""
    # isascii()+isdigit() is the str-method form of ^[0-9]+$ (isdigit alone admits e.g. "٣").
    if not (text.isascii() and text.isdigit()) or len(text) > _MAX_TIMESTAMP_DIGITS:
        raise _malformed(2, "not a decimal Unix timestamp")
    return int(text)


def parse_signature(text: str) -> bytes:
    """Parse the signature header: exactly 128 hex digits (either case) into 64 bytes."""
    if len(text) != _SIGNATURE_HEX_CHARS or not text.isascii():
        raise _malformed(3, "not 128 hexadecimal characters")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise _malformed(3, "not 128 hexadecimal characters") from None
    # fromhex skips whitespace, so an embedded space shows up as a short result.
    if len(raw) != _SIGNATURE_HEX_CHARS // 2:
        raise _malformed(3, "not 128 hexadecimal characters")
    return raw
