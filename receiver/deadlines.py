"""Coarse timeouts for the hot path: one timer for all of them.

Each delivery is bounded three times (reading its body, committing it, each callback), and
`asyncio.timeout` schedules and cancels a timer for every one of them: about a tenth of
the event loop's instructions per delivery (bench/README, "Design figures"). These bounds
are seconds long and are almost never reached, so here entering a scope only records its
deadline, and one sweep per `resolution` (run only while scopes are open) cancels the
tasks whose deadline has passed. A deadline fires up to `resolution` late.

The semantics are `asyncio.timeout`'s: the task is cancelled, and the scope turns that
cancellation (and only that one) into TimeoutError on exit.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

__all__ = ["Deadlines"]


class Deadlines:
    """Hands out `scope(seconds)` timeouts swept every ``resolution`` seconds."""

    def __init__(self, resolution: float = 0.1) -> None:
        self.resolution = resolution
        # The event loop in use, its open scopes and its pending sweep. A receiver runs on
        # one loop at a time; a scope opened on another loop (a receiver restarted on a
        # new one) starts afresh there.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._scopes: dict[_Scope, None] = {}
        self._sweep_at: asyncio.TimerHandle | None = None

    def scope(self, seconds: float | None) -> _Scope:
        """An async context manager like ``asyncio.timeout(seconds)`` (None: no limit)."""
        return _Scope(self, seconds)

    def _opened(self, scope: _Scope, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:
            self._loop, self._scopes, self._sweep_at = loop, {}, None
        self._scopes[scope] = None
        if self._sweep_at is None:
            self._sweep_at = loop.call_later(self.resolution, self._sweep, loop)

    def _closed(self, scope: _Scope) -> None:
        self._scopes.pop(scope, None)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self._loop:
            return  # a loop no longer in use
        scopes = self._scopes
        now = loop.time()
        for scope in [s for s in scopes if s.when <= now]:
            del scopes[scope]
            scope.expire()
        # Nothing open: no timer until the next scope opens.
        self._sweep_at = loop.call_later(self.resolution, self._sweep, loop) if scopes else None


class _Scope:
    __slots__ = ("_cancelling", "_deadlines", "_expired", "_seconds", "_task", "when")

    def __init__(self, deadlines: Deadlines, seconds: float | None) -> None:
        self._deadlines = deadlines
        self._seconds = seconds
        self._expired = False
        self._task: asyncio.Task[object] | None = None
        self._cancelling = 0
        self.when = 0.0

    async def __aenter__(self) -> _Scope:
        if self._seconds is None:
            return self
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline scope must be entered in a task")
        loop = task.get_loop()
        self._task = task
        self._cancelling = task.cancelling()
        self.when = loop.time() + self._seconds
        self._deadlines._opened(self, loop)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is None:
            return
        self._deadlines._closed(self)
        if (
            self._expired
            and self._task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc

    def expire(self) -> None:
        """The deadline passed (the sweep calls this once): cancel the task."""
        self._expired = True
        assert self._task is not None
        self._task.cancel()

    def expired(self) -> bool:
        """True once the deadline passed (as `asyncio.Timeout.expired`)."""
        return self._expired
