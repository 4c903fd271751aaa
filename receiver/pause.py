"""Follows the store-wide dispatch switch and applies it to this replica.

Every replica re-reads the one-row switch (store/control.py) each `poll_seconds`; on
PostgreSQL the receiver's listener (store/listener.py, also on ``falhook_control``) calls
`poke` so it re-reads at once when any replica (or the CLI) changes it. A change seen is
applied to the local dispatcher, the ``falhook_dispatch_paused`` gauge, and one log line.
A store that cannot be read leaves the last known state in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from falhook.receiver.errors import StoreUnavailableError
from falhook.receiver.store import Store
from falhook.receiver.store.control import DispatchControl

__all__ = ["PauseWatcher"]

log = logging.getLogger("falhook.dispatch")


class PauseWatcher:
    """Reads the switch now and then (and on NOTIFY); calls `apply` when it changes."""

    def __init__(
        self,
        store: Store,
        apply: Callable[[DispatchControl], None],
        *,
        poll_seconds: float = 1.0,
    ) -> None:
        self.store = store
        self.apply = apply
        self.poll_seconds = poll_seconds
        self.current: DispatchControl | None = None  # None until first read
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        """Read the switch once (so a paused store starts paused), then follow it."""
        await self.refresh()
        self._task = asyncio.create_task(self._run(), name="falhook-pause-watcher")

    def poke(self) -> None:
        """The switch may have changed: read it now."""
        self._changed.set()

    async def refresh(self) -> DispatchControl | None:
        """Read the switch and apply it if it changed; keep the last state on a store error."""
        try:
            control = await asyncio.to_thread(self.store.dispatch_control)
        except StoreUnavailableError as exc:
            log.debug("cannot read the dispatch switch (keeping the last state): %s", exc)
            return self.current
        self.seen(control)
        return control

    def seen(self, control: DispatchControl) -> None:
        """Apply a state read (or just written) here, logging only a change of paused."""
        previous = self.current
        self.current = control
        if previous is not None and previous.paused == control.paused:
            return
        self.apply(control)
        if control.paused:
            log.warning(
                "dispatch paused: no new callbacks start until resumed (reason: %s, by: %s)",
                control.reason or "none given",
                control.changed_by or "unknown",
                extra={"paused": True, "reason": control.reason},
            )
        elif previous is not None:
            log.warning(
                "dispatch resumed (by: %s)",
                control.changed_by or "unknown",
                extra={"paused": False},
            )

    async def _run(self) -> None:
        # A flag, not task.cancel(): Python 3.11's wait_for can swallow a cancellation
        # that lands as the awaited event fires (a NOTIFY during shutdown).
        while not self._stopping:
            waiter = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait([waiter], timeout=self.poll_seconds)
            finally:
                waiter.cancel()
            self._changed.clear()
            if not self._stopping:
                await self.refresh()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._stopping = True
            self._changed.set()
            with contextlib.suppress(asyncio.CancelledError):
                await task
