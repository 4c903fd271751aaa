"""Header extraction from every supported container, and the format parsers."""

from __future__ import annotations

import httpx
import pytest
from starlette.datastructures import Headers

from falhook.verify._headers import extract, parse_signature, parse_timestamp
from falhook.verify.errors import Reason, WebhookVerificationError

SIG = "ab" * 64
CANON = {
    "X-Fal-Webhook-Request-Id": "req-1",
    "X-Fal-Webhook-User-Id": "user-1",
    "X-Fal-Webhook-Timestamp": "1700000000",
    "X-Fal-Webhook-Signature": SIG,
}
EXPECTED = ("req-1", "user-1", "1700000000", SIG)


def _asgi(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode()) for k, v in headers.items()]


@pytest.mark.parametrize(
    "container",
    [
        CANON,
        {k.lower(): v for k, v in CANON.items()},
        {k.upper(): v for k, v in CANON.items()},
        list(CANON.items()),
        _asgi(CANON),
        [(k.encode(), v.encode()) for k, v in CANON.items()],  # non-lowercase bytes names
        tuple(_asgi(CANON)),
        iter(_asgi(CANON)),
        Headers(raw=_asgi(CANON)),
        httpx.Headers(CANON),
    ],
    ids=[
        "dict",
        "lower",
        "upper",
        "pairs",
        "asgi",
        "bytes-mixed",
        "tuple",
        "iter",
        "starlette",
        "httpx",
    ],
)
def test_extract_from_every_container(container: object) -> None:
    """Names are case-insensitive in every supported container."""
    assert extract(container) == EXPECTED  # type: ignore[arg-type]


@pytest.mark.parametrize("name", list(CANON))
@pytest.mark.parametrize("empty", [True, False])
def test_missing_or_empty_header_names_the_header(name: str, empty: bool) -> None:
    """Missing and empty both say missing_header, with the canonical name."""
    headers = dict(CANON)
    if empty:
        headers[name] = ""
    else:
        del headers[name]
    with pytest.raises(WebhookVerificationError) as info:
        extract(headers)
    assert info.value.reason is Reason.MISSING_HEADER
    assert info.value.header == name


def test_empty_bytes_value_is_missing() -> None:
    """An empty ASGI value is missing, not malformed."""
    pairs = _asgi(CANON)
    pairs[1] = (pairs[1][0], b"")
    with pytest.raises(WebhookVerificationError) as info:
        extract(pairs)
    assert info.value.reason is Reason.MISSING_HEADER


def test_duplicate_header_is_malformed() -> None:
    """Two signatures are ambiguous."""
    pairs = [*_asgi(CANON), (b"X-Fal-Webhook-Signature", SIG.encode())]
    with pytest.raises(WebhookVerificationError) as info:
        extract(pairs)
    assert info.value.reason is Reason.MALFORMED_HEADER
    assert info.value.header == "X-Fal-Webhook-Signature"


@pytest.mark.parametrize(
    "value", [b"\xff\xfe", b"req\n1", b"req\x00", "tab\tid", 42, ["list"]], ids=repr
)
def test_garbage_values_are_malformed(value: object) -> None:
    """Non-UTF-8, control characters and non-string values are malformed_header."""
    pairs: list[tuple[object, object]] = list(_asgi(CANON))
    pairs[0] = (b"x-fal-webhook-request-id", value)
    with pytest.raises(WebhookVerificationError) as info:
        extract(pairs)  # type: ignore[arg-type]
    assert info.value.reason is Reason.MALFORMED_HEADER


def test_non_pair_containers_are_type_errors() -> None:
    """Passing something that is not headers at all is a programming error."""
    with pytest.raises(TypeError):
        extract("X-Fal-Webhook-Signature: x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        extract([1, 2, 3])  # type: ignore[list-item]


@pytest.mark.parametrize("text", ["1700000000", "0", "9" * 20])
def test_parse_timestamp_accepts_digits(text: str) -> None:
    """Plain ASCII decimal digits."""
    assert parse_timestamp(text) == int(text)


@pytest.mark.parametrize(
    "text",
    [
        " 1700000000",
        "+1700000000",
        "-1",
        "1_700_000_000",
        "\u0661\u0667\u0660\u0660",  # Arabic-Indic digits: int() accepts them
        "1.5",
        "9" * 21,
        "0x10",
    ],
)
def test_parse_timestamp_rejects_what_int_would_accept(text: str) -> None:
    """int() accepts signs, spaces, underscores and other digits; fal's header is ^[0-9]+$."""
    with pytest.raises(WebhookVerificationError) as info:
        parse_timestamp(text)
    assert info.value.reason is Reason.MALFORMED_HEADER
    assert info.value.header == "X-Fal-Webhook-Timestamp"


def test_parse_signature_accepts_either_case() -> None:
    """Upper-case hex is the same signature."""
    assert parse_signature(SIG.upper()) == parse_signature(SIG) == bytes.fromhex(SIG)


@pytest.mark.parametrize(
    "text",
    [SIG[:-2], SIG + "ab", "zz" * 64, "ab " * 42 + "ab", " " + SIG[1:], "é" * 128, "0x" + SIG[2:]],
)
def test_parse_signature_rejects_non_hex(text: str) -> None:
    """Exactly 128 hex digits; whitespace, prefixes and other lengths are malformed."""
    with pytest.raises(WebhookVerificationError) as info:
        parse_signature(text)
    assert info.value.reason is Reason.MALFORMED_HEADER


def test_check_headers_decides_what_headers_alone_decide() -> None:
    from falhook.verify import WebhookHeaders, check_headers

    checked = check_headers(CANON, user_id="user-1", now=1_700_000_100)
    assert checked == WebhookHeaders("req-1", "user-1", 1_700_000_000, "1700000000", b"\xab" * 64)
    for headers, now, user, reason in [
        ({}, 1_700_000_000, None, Reason.MISSING_HEADER),
        ({**CANON, "X-Fal-Webhook-Signature": "zz"}, 1_700_000_000, None, Reason.MALFORMED_HEADER),
        (CANON, 1_700_000_301, None, Reason.TIMESTAMP_TOO_OLD),
        (CANON, 1_699_999_699, None, Reason.TIMESTAMP_TOO_NEW),
        (CANON, 1_700_000_000, "user-2", Reason.USER_MISMATCH),
    ]:
        with pytest.raises(WebhookVerificationError) as info:
            check_headers(headers, user_id=user, now=now)
        assert info.value.reason is reason
