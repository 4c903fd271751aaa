"""When to try a failed callback again."""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["Backoff", "Retry", "RetryPolicy", "doubling"]


def doubling(attempt: int, first: float, cap: float) -> float:
    """``first`` after attempt 1, then twice as long after each further one, capped at ``cap``."""
    exponent = min(max(attempt - 1, 0), 62)  # 2**62 already exceeds any sane cap
    return float(min(cap, first * 2.0**exponent))


class Backoff:
    """A reconnect/retry delay that doubles on each failure and starts over on success."""

    __slots__ = ("_failures", "cap", "first")

    def __init__(self, first: float, cap: float) -> None:
        self.first = first
        self.cap = cap
        self._failures = 0

    def failed(self) -> float:
        """Record a failure; the seconds to wait before the next try."""
        self._failures += 1
        return doubling(self._failures, self.first, self.cap)

    def succeeded(self) -> None:
        """Start over from `first`."""
        self._failures = 0


class Retry(Exception):  # noqa: N818 — a control-flow signal, named for what the callback asks
    """Raise from a callback to ask for another attempt, optionally after `after` seconds.

    It still counts as a failed attempt (so a delivery cannot retry forever), but the
    delay is the callback's choice instead of the backoff's.
    """

    def __init__(self, after: float | None = None, message: str = "callback asked to retry"):
        super().__init__(message)
        self.after = after


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter, up to `max_attempts` attempts in all.

    After failed attempt ``n`` (1-based) the next attempt waits
    ``d = min(max_delay, base_delay * 2 ** (n - 1))`` scaled by a jitter factor drawn
    uniformly from ``[1 - jitter, 1]``, so replicas that failed together do not retry in
    lockstep. After attempt ``max_attempts`` fails, the delivery is dead.
    """

    max_attempts: int = 10
    base_delay: float = 2.0
    max_delay: float = 3600.0
    jitter: float = 0.5

    def gives_up_after(self, attempt: int) -> bool:
        """True when failed attempt number `attempt` was the last one allowed."""
        return attempt >= self.max_attempts

    def delay(self, attempt: int, *, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt `attempt` (1-based)."""
        ceiling = doubling(attempt, self.base_delay, self.max_delay)
        factor = 1.0 - self.jitter * (rng or random).random()
        return ceiling * factor
