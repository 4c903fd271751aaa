"""Deadlines: asyncio.timeout's semantics with one shared sweep."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from falhook.receiver.deadlines import Deadlines


def _run(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test on a fresh event loop (the suite has no async plugin)."""

    def run() -> None:
        asyncio.run(test())

    run.__name__ = test.__name__
    return run


@_run
async def test_a_scope_past_its_deadline_raises_timeout_error() -> None:
    deadlines = Deadlines(resolution=0.01)
    with pytest.raises(TimeoutError):
        async with deadlines.scope(0.02) as scope:
            await asyncio.Event().wait()  # never set: only the deadline ends this
    assert scope.expired()


@_run
async def test_a_scope_that_finishes_in_time_is_left_alone() -> None:
    deadlines = Deadlines(resolution=0.01)
    async with deadlines.scope(5) as scope:
        await asyncio.sleep(0)
    assert not scope.expired()
    assert deadlines._sweep_at is not None  # the sweep runs once more, finds nothing
    for _ in range(100):
        if deadlines._sweep_at is None:
            break
        await asyncio.sleep(0.01)
    assert deadlines._sweep_at is None, "an idle Deadlines keeps no timer"


@_run
async def test_none_means_no_limit() -> None:
    deadlines = Deadlines(resolution=0.01)
    async with deadlines.scope(None) as scope:
        await asyncio.sleep(0.03)
    assert not scope.expired() and deadlines._sweep_at is None


@_run
async def test_a_cancellation_from_outside_stays_a_cancellation() -> None:
    deadlines = Deadlines(resolution=0.01)
    started = asyncio.Event()

    async def waits() -> None:
        async with deadlines.scope(60):
            started.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(waits())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@_run
async def test_nested_scopes_each_answer_for_their_own_deadline() -> None:
    deadlines = Deadlines(resolution=0.01)
    with pytest.raises(TimeoutError):
        async with deadlines.scope(0.02) as inner_outer:
            try:
                async with deadlines.scope(30) as inner:
                    await asyncio.Event().wait()
            finally:
                assert not inner.expired()
    assert inner_outer.expired()


@_run
async def test_many_scopes_share_one_timer() -> None:
    deadlines = Deadlines(resolution=0.01)

    async def short(i: int) -> str:
        try:
            async with deadlines.scope(0.02 if i % 2 else 60):
                if i % 2:
                    await asyncio.Event().wait()
                await asyncio.sleep(0)
                return "done"
        except TimeoutError:
            return "timeout"

    results = await asyncio.gather(*(short(i) for i in range(50)))
    assert results == ["timeout" if i % 2 else "done" for i in range(50)]
