"""Durations and points in time as operators type them: ``7d``, ``36h``, ``1h30m``, ISO 8601.

``parse_duration("36h") == 129600.0``; ``parse_since("2d", now=t) == t - 172800``;
``parse_since("2025-07-09T00:00:00Z")`` is that instant (a timestamp without a zone is UTC).
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime

__all__ = ["format_duration", "format_time", "parse_duration", "parse_since"]

_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+")


def parse_duration(text: str) -> float:
    """Seconds in ``text``: one or more ``<number><unit>`` parts, units s m h d w.

    Raises ValueError with a message fit for a user (the CLI prints it as is).
    """
    cleaned = text.strip().lower().replace(" ", "")
    if not cleaned or not _WHOLE.fullmatch(cleaned):
        raise ValueError(
            f"{text!r} is not a duration: use a number and a unit (s, m, h, d, w), "
            "e.g. 90m, 36h, 7d, 2w or 1h30m"
        )
    return sum(float(number) * _UNITS[unit] for number, unit in _PART.findall(cleaned))


def parse_since(text: str, *, now: float | None = None) -> float:
    """A Unix time from a duration ago (``2d``) or an ISO 8601 timestamp (UTC if no zone)."""
    stripped = text.strip()
    try:
        return (time.time() if now is None else now) - parse_duration(stripped)
    except ValueError:
        pass
    iso = stripped[:-1] + "+00:00" if stripped.endswith(("Z", "z")) else stripped
    try:
        moment = datetime.fromisoformat(iso)
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (e.g. 36h, 7d) nor an ISO 8601 time "
            "(e.g. 2025-07-09 or 2025-07-09T12:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def format_time(ts: float | None) -> str | None:
    """ISO 8601 UTC with a ``Z``, to the second (None stays None, and so does a time no
    calendar holds: an infinite retry time an older version could store)."""
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return None


def format_duration(seconds: float) -> str:
    """The form an operator types, largest units first: ``7d``, ``1d12h``, ``2h59m``, ``45s``.

    ``parse_duration(format_duration(x)) == x``; a value is never rounded to another unit
    (``2h59m``, not ``179m``), so what the CLI echoes is what was asked for.
    """
    parts = []
    rest = seconds
    for unit in ("d", "h", "m"):
        size = _UNITS[unit]
        if rest >= size:
            count = int(rest // size)
            rest -= count * size
            parts.append(f"{count}{unit}")
    if rest or not parts:
        parts.append(f"{rest:g}s")
    return "".join(parts)
