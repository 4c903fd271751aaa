"""Plain ``def`` callbacks, run in threads, with one hand-off per batch instead of per call.

`loop.run_in_executor` costs, for every call, a wake-up of a pool thread (which then
contends with the event loop for the GIL) and a thread-safe wake-up of the loop with the
result. Under load the dispatcher starts many deliveries in the same loop iteration, so
`SyncRunner` queues them and wakes one thread per iteration, which runs the queued calls
one after another; results go back in one `call_soon_threadsafe` for all that finished
while the loop was busy.

Running calls one after another must not let a slow one hold up the rest: when a call has
waited ``stall_seconds`` in the queue, every thread is inside a call and none has started
one since the last look, as many more threads are woken as there are calls waiting
(started when first needed, never more than ``workers``). The loop itself never waits for a
callback.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import functools
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["SyncCall", "SyncRunner"]

_STOP = object()
_QUEUED, _RUNNING, _FINISHED = 0, 1, 2  # a call's states
_IDLE, _DRAINING, _CALLING = 0, 1, 2  # a thread's states


class SyncCall:
    """One call's handle, with the two methods of a `concurrent.futures.Future` that a
    caller watching a thread needs: `done` (returned, or never started) and
    `add_done_callback` (called in the worker thread, or at once if already done)."""

    __slots__ = ("arg", "callbacks", "fn", "future", "queued_at", "state")

    def __init__(
        self, future: asyncio.Future[Any], fn: Callable[[Any], Any], arg: Any, queued_at: float
    ) -> None:
        self.future = future
        self.fn = fn
        self.arg = arg
        self.queued_at = queued_at
        self.state = _QUEUED
        self.callbacks: list[Callable[[SyncCall], None]] | None = None

    def done(self) -> bool:
        return self.state == _FINISHED

    def add_done_callback(self, fn: Callable[[SyncCall], None]) -> None:
        with _CALLBACKS_LOCK:
            if self.state != _FINISHED:
                if self.callbacks is None:
                    self.callbacks = []
                self.callbacks.append(fn)
                return
        fn(self)

    def _finish(self) -> None:
        with _CALLBACKS_LOCK:
            self.state = _FINISHED
            callbacks, self.callbacks = self.callbacks, None
        for fn in callbacks or ():
            fn(self)


# Watching a call is rare (a timed-out callback); one lock for all of them is enough.
_CALLBACKS_LOCK = threading.Lock()


def _run_in(context: contextvars.Context, fn: Callable[[Any], Any], arg: Any) -> Any:
    return context.run(fn, arg)


class SyncRunner:
    """Runs sync functions in up to ``workers`` threads; `run` awaits one call's result."""

    def __init__(
        self,
        workers: int,
        *,
        stall_seconds: float = 0.002,
        name: str = "falhook-callback",
        carry_context: bool = False,
    ) -> None:
        """`carry_context`: each call runs in a copy of its caller's context variables (for
        tracing: a callback's spans are children of its delivery's)."""
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.workers = workers
        self.carry_context = carry_context
        self.stall_seconds = stall_seconds
        self._name = name
        self._pending: collections.deque[SyncCall] = collections.deque()  # thread-safe ends
        self._wakeups: queue.SimpleQueue[object] = queue.SimpleQueue()  # one token, one thread
        self._results: list[tuple[SyncCall, bool, Any]] = []
        self._results_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._kick_scheduled = False
        self._watch: asyncio.TimerHandle | None = None
        self._stopped = False
        # What each thread is doing, written only by that thread (no lock needed); they
        # steer wake-ups, never correctness.
        self._states: list[int] = []
        self._started = 0  # calls taken by a thread (a lost update still shows a change)
        self._started_seen = -1  # ... at the last stall check

    @property
    def threads(self) -> int:
        """Threads started so far (they stay until `stop`)."""
        return len(self._threads)

    async def run(
        self, fn: Callable[[Any], Any], arg: Any, calls: list[SyncCall] | None = None
    ) -> Any:
        """``fn(arg)`` in a worker thread; its result, or its exception raised here.

        If given, ``calls`` receives the call's `SyncCall` handle (to watch a thread that
        outlives a timeout). A call cancelled before a thread took it never runs.
        """
        if self._stopped:
            raise RuntimeError("SyncRunner is stopped")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self.carry_context:
            fn = functools.partial(_run_in, contextvars.copy_context(), fn)
        call = SyncCall(future, fn, arg, time.monotonic())
        if calls is not None:
            calls.append(call)
        self._pending.append(call)
        if not self._kick_scheduled:
            # Wake a thread once this loop iteration is over, for everything queued in it.
            self._kick_scheduled = True
            loop.call_soon(self._kick)
        return await future

    def stop(self) -> None:
        """Stop the threads once their current call returns; calls not started are cancelled."""
        self._stopped = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        while True:
            try:
                call = self._pending.popleft()
            except IndexError:
                break
            call.future.cancel()
            call._finish()  # never ran
        for _ in self._threads:
            self._wakeups.put(_STOP)

    # -- the loop's side -----------------------------------------------------------------

    def _wake(self, count: int) -> None:
        # A token is taken by whichever thread waits for one next: an idle thread, or one
        # between calls (it drains the queue before it waits again). Only threads inside a
        # call cannot help, so only they make starting another worth it: the threads then
        # never outnumber the calls in flight (a callback keeping a connection per thread
        # holds no more connections than the dispatcher runs callbacks).
        free = len(self._states) - self._states.count(_CALLING)
        missing = min(count - free, self.workers - len(self._threads))
        for _ in range(missing):
            index = len(self._threads)
            self._states.append(_DRAINING)
            thread = threading.Thread(
                target=self._work, args=(index,), name=f"{self._name}-{index}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        for _ in range(count):
            self._wakeups.put(None)

    def _kick(self) -> None:
        self._kick_scheduled = False
        if self._pending and not self._stopped:
            self._wake(1)
            if self._watch is None:
                self._arm(self.stall_seconds)

    def _arm(self, delay: float) -> None:
        assert self._loop is not None
        self._watch = self._loop.call_later(delay, self._check_stalled)

    def _check_stalled(self) -> None:
        """Calls still queued after ``stall_seconds``: one thread each (a call may be slow)."""
        self._watch = None
        if self._stopped:
            return
        try:
            oldest = self._pending[0].queued_at
        except IndexError:
            return  # everything queued has started
        waited = time.monotonic() - oldest
        if waited < self.stall_seconds:
            self._arm(self.stall_seconds - waited)
            return
        progressed = self._started != self._started_seen
        self._started_seen = self._started
        stuck = all(state == _CALLING for state in self._states)
        if stuck and not progressed:  # every thread is inside a call: a slow one, or several
            self._wake(min(len(self._pending), self.workers))
        self._arm(self.stall_seconds)

    def _deliver(self) -> None:
        with self._results_lock:
            results, self._results = self._results, []
        for call, ok, value in results:
            future = call.future
            if future.done():  # cancelled meanwhile (a timeout, shutdown)
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)

    # -- a worker thread's side -----------------------------------------------------------

    def _work(self, index: int) -> None:
        pending, wakeups, states = self._pending, self._wakeups, self._states
        while True:
            states[index] = _IDLE
            token = wakeups.get()
            states[index] = _DRAINING
            if token is _STOP:
                return
            while True:
                try:
                    call = pending.popleft()
                except IndexError:
                    break
                self._started += 1
                self._call(call, index)
                # A thread waiting for work must not keep its last call's argument (a
                # delivery: its body and parsed JSON, megabytes for a large one) alive.
                del call

    def _call(self, call: SyncCall, index: int) -> None:
        if call.future.done():  # cancelled before it started: do not run it
            call._finish()
            return
        call.state = _RUNNING
        self._states[index] = _CALLING
        try:
            result: tuple[SyncCall, bool, Any] = (call, True, call.fn(call.arg))
        except BaseException as exc:  # handed to the awaiting coroutine, not lost here
            result = (call, False, exc)
        self._states[index] = _DRAINING
        call._finish()
        self._post(result)

    def _post(self, result: tuple[SyncCall, bool, Any]) -> None:
        with self._results_lock:
            self._results.append(result)
            first = len(self._results) == 1
        if first:  # later results join this wake-up until the loop has taken them
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is waiting
                self._loop.call_soon_threadsafe(self._deliver)
