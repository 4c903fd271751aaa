"""A thread that notices when the event loop stops responding, and names who holds it.

Acknowledgements are answered on the event loop: an ``async def`` callback that blocks
(``time.sleep``, a sync HTTP client) delays every one of them, and fal gives up on a
delivery after 15 s. A task on the loop cannot see that happen, so a thread probes the
loop and, while it is stuck, reads which callback the loop is running.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["BLOCKED_SECONDS", "LoopWatchdog"]

log = logging.getLogger("falhook.receiver")
BLOCKED_SECONDS = 1.0  # a loop this late has already delayed acknowledgements noticeably
_PROBE_EVERY = 0.25


class LoopWatchdog:
    """Probe `loop` every quarter second from a daemon thread.

    ``on_lag(seconds)`` gets every probe's lateness; ``on_blocked(callback)`` is called
    (from the thread) once per stall of over `BLOCKED_SECONDS`, with the name of the async
    callback the loop was running (from `running`, keyed by task), or "" when none was.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        running: Mapping[asyncio.Task[Any], str],
        *,
        on_lag: Callable[[float], None],
        on_blocked: Callable[[str], None],
        blocked_seconds: float = BLOCKED_SECONDS,
    ) -> None:
        self.loop = loop
        self.running = running
        self.on_lag = on_lag
        self.on_blocked = on_blocked
        self.blocked_seconds = blocked_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="falhook-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _culprit(self) -> str:
        # Read from this thread while the loop is stuck: the task it is running cannot
        # change under us, and both lookups are single dict reads.
        task = asyncio.current_task(self.loop)
        return self.running.get(task, "") if task is not None else ""

    def _run(self) -> None:
        while not self._stop.wait(_PROBE_EVERY):
            answered = threading.Event()
            sent = time.monotonic()
            try:
                self.loop.call_soon_threadsafe(answered.set)
            except RuntimeError:  # the loop is closed
                return
            if not answered.wait(self.blocked_seconds):
                # Said now, not once it is over: a loop stuck for good must be reported too.
                culprit = self._culprit()
                log.warning(
                    "event loop blocked for over %g s, running %s: acknowledgements wait; "
                    "blocking code belongs in a `def` callback, not `async def`",
                    self.blocked_seconds,
                    culprit or "(no callback)",
                    extra={"callback": culprit},
                )
                self.on_blocked(culprit)
                while not answered.wait(0.5):
                    if self._stop.is_set() or self.loop.is_closed():
                        return
            self.on_lag(time.monotonic() - sent)
