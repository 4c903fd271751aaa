"""SyncRunner: plain functions in threads, one hand-off per batch, a slow call never
holding up the rest, never more threads at once than its cap."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from falhook.receiver.sync_runner import SyncRunner


async def _until(check: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_results_and_exceptions_reach_their_own_caller_from_a_worker_thread() -> None:
    loop_thread: list[int] = []
    ran_on: list[int] = []

    def double(n: int) -> int:
        ran_on.append(threading.get_ident())
        if n == 3:
            raise ValueError("three")
        return n * 2

    async def main() -> None:
        loop_thread.append(threading.get_ident())
        runner = SyncRunner(4)
        try:
            results = await asyncio.gather(
                *(runner.run(double, n) for n in range(8)), return_exceptions=True
            )
        finally:
            runner.stop()
        assert results[:3] == [0, 2, 4] and results[4:] == [8, 10, 12, 14]
        assert isinstance(results[3], ValueError) and str(results[3]) == "three"

    asyncio.run(main())
    assert len(ran_on) == 8 and loop_thread[0] not in ran_on


def test_calls_queued_in_one_loop_iteration_share_one_thread_in_order() -> None:
    order: list[tuple[int, str]] = []

    def note(n: int) -> None:
        order.append((n, threading.current_thread().name))

    async def main() -> None:
        # A stall limit far away: only the batch's own wake-up can run these.
        runner = SyncRunner(8, stall_seconds=60)
        try:
            await asyncio.gather(*(runner.run(note, n) for n in range(20)))
        finally:
            runner.stop()

    asyncio.run(main())
    assert [n for n, _ in order] == list(range(20))
    assert len({name for _, name in order}) == 1, order


def test_a_slow_call_does_not_hold_up_the_calls_queued_behind_it() -> None:
    release = threading.Event()
    fast_done: list[int] = []

    def slow(_: int) -> str:
        release.wait(10)
        return "slow"

    def fast(n: int) -> int:
        fast_done.append(n)
        return n

    async def main() -> None:
        runner = SyncRunner(4, stall_seconds=0.01)
        try:
            slow_call = asyncio.ensure_future(runner.run(slow, 0))
            fast_calls = [asyncio.ensure_future(runner.run(fast, n)) for n in range(1, 6)]
            # Same iteration: one thread took the slow call first; the stall check must
            # hand the rest to other threads while it is still blocked.
            results = await asyncio.wait_for(asyncio.gather(*fast_calls), 5)
            assert results == [1, 2, 3, 4, 5]
            assert not slow_call.done()
            ticks = 0
            for _ in range(3):  # and the loop itself is free
                await asyncio.sleep(0)
                ticks += 1
            assert ticks == 3
            release.set()
            assert await asyncio.wait_for(slow_call, 5) == "slow"
        finally:
            release.set()
            runner.stop()

    asyncio.run(main())
    assert sorted(fast_done) == [1, 2, 3, 4, 5]


def test_never_more_calls_at_once_than_workers() -> None:
    lock = threading.Lock()
    release = threading.Event()
    running = 0
    peak = 0
    started = 0

    def held(_: int) -> None:
        nonlocal running, peak, started
        with lock:
            running += 1
            started += 1
            peak = max(peak, running)
        release.wait(10)
        with lock:
            running -= 1

    async def main() -> None:
        runner = SyncRunner(2, stall_seconds=0.001)
        try:
            calls = [asyncio.ensure_future(runner.run(held, n)) for n in range(6)]
            await _until(lambda: started == 2)
            await asyncio.sleep(0.05)  # stall checks keep firing; still only two run
            assert started == 2
            release.set()
            await asyncio.wait_for(asyncio.gather(*calls), 5)
        finally:
            release.set()
            runner.stop()

    asyncio.run(main())
    assert peak == 2 and started == 6


def test_stop_cancels_calls_not_started() -> None:
    release = threading.Event()
    ran: list[int] = []

    def held(n: int) -> None:
        ran.append(n)
        release.wait(10)

    async def main() -> None:
        runner = SyncRunner(1, stall_seconds=60)
        first = asyncio.ensure_future(runner.run(held, 0))
        queued = asyncio.ensure_future(runner.run(held, 1))
        await _until(lambda: ran == [0])
        runner.stop()
        with pytest.raises(asyncio.CancelledError):
            await queued
        release.set()
        await asyncio.wait_for(first, 5)  # the running call still finishes
        with pytest.raises(RuntimeError):
            await runner.run(held, 2)

    asyncio.run(main())
    assert ran == [0]


def test_a_cancelled_wait_is_not_resolved_later() -> None:
    """A caller that gave up (a timeout) leaves the result unused, and nothing breaks."""
    release = threading.Event()

    def held(_: Any) -> str:
        release.wait(10)
        return "late"

    async def main() -> None:
        runner = SyncRunner(2)
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(runner.run(held, None), 0.05)
            release.set()
            assert await asyncio.wait_for(runner.run(lambda x: x, "next"), 5) == "next"
        finally:
            release.set()
            runner.stop()

    asyncio.run(main())


def test_a_call_outliving_its_caller_is_watched_through_its_handle() -> None:
    """What a callback timeout needs: the running call's thread is seen until it returns."""
    release = threading.Event()
    returned = threading.Event()

    def held(_: Any) -> None:
        release.wait(10)

    async def main() -> None:
        runner = SyncRunner(1, stall_seconds=60)
        try:
            running: list[Any] = []
            queued: list[Any] = []
            first = asyncio.ensure_future(runner.run(held, None, running))
            second = asyncio.ensure_future(runner.run(held, None, queued))
            await _until(lambda: bool(running) and running[0].state == 1)
            first.cancel()
            second.cancel()
            await asyncio.gather(first, second, return_exceptions=True)
            assert not running[0].done()  # its thread still runs
            running[0].add_done_callback(lambda _: returned.set())
            release.set()
            await _until(returned.is_set)
            await _until(queued[0].done)  # the queued one was dropped, never run
            fired: list[bool] = []
            queued[0].add_done_callback(lambda _: fired.append(True))  # already done: at once
            assert fired == [True]
        finally:
            release.set()
            runner.stop()

    asyncio.run(main())


def test_threads_stay_within_the_calls_in_flight_round_after_round() -> None:
    """Callers that each queue their next call as soon as the last returns (the dispatcher
    refilling its slots) never make the runner start more threads than calls in flight,
    whatever its cap: a thread finishing its call is not a reason to start another (a
    callback keeping a connection per thread would otherwise hold twice as many)."""
    slots, rounds = 8, 25

    def brief(_: int) -> None:
        time.sleep(0.004)  # long enough for stall checks to find every thread in a call

    async def main() -> int:
        runner = SyncRunner(4 * slots, stall_seconds=0.001)

        async def slot(n: int) -> None:
            for _ in range(rounds):
                await runner.run(brief, n)

        try:
            await asyncio.wait_for(asyncio.gather(*(slot(n) for n in range(slots))), 30)
            return runner.threads
        finally:
            runner.stop()

    assert asyncio.run(main()) <= slots
