"""Durations (``7d``, ``1h30m``) and --since values (a duration ago, or ISO 8601)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from falhook.receiver.durations import format_duration, format_time, parse_duration, parse_since


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("45s", 45),
        ("90m", 5400),
        ("36h", 129600),
        ("7d", 604800),
        ("2w", 1209600),
        ("1h30m", 5400),
        ("1.5h", 5400),
        (" 7D ", 604800),
        ("1d 12h", 129600),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7", "d", "7x", "-1h", "h7", "7d garbage", "1e3s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


def test_since_duration_is_relative_to_now() -> None:
    assert parse_since("2d", now=1_000_000.0) == 1_000_000.0 - 172800


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-07-09T12:00:00Z", datetime(2025, 7, 9, 12, tzinfo=UTC)),
        ("2025-07-09T12:00:00+00:00", datetime(2025, 7, 9, 12, tzinfo=UTC)),
        ("2025-07-09T14:00:00+02:00", datetime(2025, 7, 9, 12, tzinfo=UTC)),
        ("2025-07-09T12:00:00", datetime(2025, 7, 9, 12, tzinfo=UTC)),  # no zone: UTC
        ("2025-07-09", datetime(2025, 7, 9, tzinfo=UTC)),
    ],
)
def test_since_iso(text: str, expected: datetime) -> None:
    assert parse_since(text) == expected.timestamp()


def test_since_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="neither a duration"):
        parse_since("yesterday")


def test_format() -> None:
    assert format_time(None) is None
    assert format_time(float("inf")) is None and format_time(1e300) is None
    assert format_time(datetime(2025, 7, 9, 12, 0, 5, tzinfo=UTC).timestamp()) == (
        "2025-07-09T12:00:05Z"
    )
    cases = {
        604800: "7d",
        10800: "3h",
        5400: "1h30m",
        10740: "2h59m",
        129600: "1d12h",
        90.5: "1m30.5s",
        45: "45s",
        0.5: "0.5s",
        0: "0s",
    }
    assert {s: format_duration(s) for s in cases} == cases
    for seconds in cases:
        assert parse_duration(format_duration(seconds)) == seconds
