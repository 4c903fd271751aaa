"""RetryPolicy: exponential backoff with jitter, capped; gives up after max_attempts."""

from __future__ import annotations

import random

import pytest

from falhook.receiver import Retry, RetryPolicy
from falhook.receiver.retry import Backoff, doubling


@pytest.mark.parametrize("attempt", range(1, 15))
def test_delay_is_within_the_jittered_exponential_bounds(attempt: int) -> None:
    policy = RetryPolicy(max_attempts=20, base_delay=2.0, max_delay=3600.0, jitter=0.5)
    ceiling = min(3600.0, 2.0 * 2 ** (attempt - 1))
    rng = random.Random(attempt)
    delays = [policy.delay(attempt, rng=rng) for _ in range(200)]
    assert all(ceiling * 0.5 <= d <= ceiling for d in delays)
    assert max(delays) - min(delays) > ceiling * 0.3  # it really is jittered


def test_delay_is_deterministic_with_a_seeded_rng() -> None:
    policy = RetryPolicy(base_delay=0.05)
    first = [policy.delay(n, rng=random.Random(42)) for n in range(1, 6)]
    second = [policy.delay(n, rng=random.Random(42)) for n in range(1, 6)]
    assert first == second


def test_delay_doubles_and_is_capped() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=10.0, jitter=0.0)
    assert [policy.delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert policy.delay(10_000) == 10.0  # no overflow on absurd attempt numbers
    assert policy.delay(0) == 1.0


def test_gives_up_after_max_attempts() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert [policy.gives_up_after(n) for n in (1, 2, 3, 4)] == [False, False, True, True]
    assert RetryPolicy(max_attempts=1).gives_up_after(1)


def test_retry_carries_its_delay() -> None:
    assert Retry(after=1.5).after == 1.5
    assert Retry().after is None
    assert isinstance(Retry(), Exception)


def test_doubling_starts_at_first_and_is_capped() -> None:
    assert [doubling(n, 0.5, 3.0) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert doubling(10_000, 1.0, 60.0) == 60.0  # no overflow for absurd attempt numbers
    assert doubling(0, 1.0, 60.0) == 1.0


def test_backoff_doubles_on_failure_and_starts_over_on_success() -> None:
    backoff = Backoff(0.1, 0.4)
    assert [backoff.failed() for _ in range(4)] == [0.1, 0.2, 0.4, 0.4]
    backoff.succeeded()
    assert backoff.failed() == 0.1
