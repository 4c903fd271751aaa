"""Giving memory back after large bodies: when the policy trims (thresholds, settling,
the rate limit, with the time passed in), and that the trimmer runs the trim off the
event loop, only when wanted."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import pytest

from falhook.receiver.memtrim import MemoryTrimmer, TrimPolicy, malloc_trim

MiB = 1024 * 1024


def _policy() -> TrimPolicy:
    return TrimPolicy(threshold=4 * MiB, low=MiB, settle=0.5, every=5.0)


def test_small_bodies_never_want_a_trim() -> None:
    policy = _policy()
    for _ in range(10_000):  # a busy receiver of 2 KB deliveries, 32 at once
        policy.buffered(32 * 2048)
        assert not policy.wanted(0)


def test_a_trim_is_wanted_once_much_was_buffered_and_little_is_now() -> None:
    policy = _policy()
    policy.buffered(3 * MiB)
    assert not policy.wanted(0)  # below the threshold
    policy.buffered(5 * MiB)
    assert not policy.wanted(2 * MiB)  # still buffering: not now
    assert policy.wanted(MiB)  # near zero counts
    assert policy.wanted(0)


def test_large_bodies_whose_callbacks_finished_add_up() -> None:
    policy = _policy()
    policy.finished(2 * MiB)
    assert not policy.wanted(0)
    policy.finished(2 * MiB)
    assert policy.wanted(0)


def test_a_trim_waits_to_settle_and_at_most_once_per_interval() -> None:
    policy = _policy()
    policy.buffered(8 * MiB)
    assert policy.delay(now=100.0) == 0.5  # first trim: after settling only
    assert policy.may_run(now=100.5)
    policy.trimmed(now=100.5)
    assert not policy.wanted(0)  # what was held before the trim no longer counts
    policy.buffered(8 * MiB)
    assert policy.wanted(0)
    assert policy.delay(now=101.0) == pytest.approx(4.5)  # 5 s after the previous one
    assert not policy.may_run(now=105.4)
    assert policy.may_run(now=105.5)
    assert policy.delay(now=200.0) == 0.5  # long after: settling only again


class _Trims:
    """A stand-in for malloc_trim that records the thread it ran on."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def __call__(self, pad: int) -> int:
        assert pad == 0
        self.threads.append(threading.get_ident())
        return 1


async def _until(check: object, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def _trimmer(trims: _Trims, every: float = 3600.0) -> MemoryTrimmer:
    policy = TrimPolicy(threshold=4 * MiB, low=MiB, settle=0.0, every=every)
    return MemoryTrimmer(policy, trim=trims, large_body=256 * 1024)


def test_the_trim_runs_in_a_worker_thread_once_the_buffers_are_given_back() -> None:
    async def main() -> None:
        trims = _Trims()
        trimmer = _trimmer(trims)
        trimmer.buffered(6 * MiB)
        trimmer.released(3 * MiB)  # half still buffered: no trim yet
        await asyncio.sleep(0.05)
        assert trims.threads == []
        trimmer.released(0)
        await _until(lambda: trimmer.trims == 1)
        assert trims.threads != [threading.get_ident()]
        # Another burst within the interval: held again, but not trimmed before it ends.
        trimmer.buffered(6 * MiB)
        trimmer.released(0)
        await asyncio.sleep(0.05)
        assert trimmer.trims == 1
        trimmer.close()

    asyncio.run(main())


def test_large_deliveries_finishing_their_callbacks_trim_and_small_ones_do_not() -> None:
    async def main() -> None:
        trims = _Trims()
        trimmer = _trimmer(trims, every=0.0)
        for _ in range(1000):
            trimmer.finished(200 * 1024)  # under large_body: not counted
        await asyncio.sleep(0.05)
        assert trimmer.trims == 0
        trimmer.finished(3 * MiB)
        trimmer.finished(3 * MiB)
        await _until(lambda: trimmer.trims == 1)
        trimmer.close()

    asyncio.run(main())


def test_close_cancels_a_trim_not_started() -> None:
    async def main() -> None:
        trims = _Trims()
        policy = TrimPolicy(threshold=MiB, low=0, settle=0.05, every=0.0)
        trimmer = MemoryTrimmer(policy, trim=trims)
        trimmer.buffered(2 * MiB)
        trimmer.released(0)
        trimmer.close()
        await asyncio.sleep(0.2)
        assert trims.threads == []

    asyncio.run(main())


def test_without_malloc_trim_nothing_is_scheduled() -> None:
    async def main() -> None:
        trimmer = MemoryTrimmer(TrimPolicy(threshold=1, low=0, settle=0.0), trim=None)
        assert not trimmer.enabled
        trimmer.buffered(10 * MiB)
        trimmer.released(0)
        trimmer.finished(10 * MiB)
        await asyncio.sleep(0.05)
        assert trimmer.trims == 0

    asyncio.run(main())


def test_glibc_malloc_trim_is_found_on_linux() -> None:
    if not sys.platform.startswith("linux"):
        assert malloc_trim is None
        return
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc: no malloc_trim to find")
    assert malloc_trim is not None
    assert malloc_trim(0) in (0, 1)
