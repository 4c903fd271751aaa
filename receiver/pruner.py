"""Retention: `falhook serve` deletes done deliveries past FALHOOK_RETENTION by itself.

Without it a store grows until someone sets up ``falhook prune`` in cron. The rules are
``falhook prune``'s defaults (done only: dead deliveries are left for an operator). Each
transaction deletes a small batch, in a thread, with a pause between batches, so the
store's writer (and so every acknowledgement) waits at most one small batch. On
PostgreSQL an advisory lock lets one replica at a time prune.
"""

from __future__ import annotations

import asyncio
import logging
import time

from falhook.receiver.errors import StoreUnavailableError
from falhook.receiver.store import Store

__all__ = ["Pruner"]

log = logging.getLogger("falhook.receiver")
BATCH = 500  # rows per transaction: milliseconds of write lock
_PAUSE = 0.05  # between batches: the writer's transactions go first
_MAX_BATCHES = 200  # per round (100,000 rows); the next round goes on


class Pruner:
    """Prunes every ``interval`` seconds (a tenth of the retention, 1 s to 5 min)."""

    def __init__(self, store: Store, retention: float) -> None:
        self.store = store
        self.retention = retention
        self.interval = min(300.0, max(1.0, retention / 10))
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="falhook-pruner")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                deleted = await asyncio.to_thread(self.round)
            except StoreUnavailableError as exc:
                log.warning("retention pruning failed (will retry): %s", exc)
                continue
            if deleted:
                log.info(
                    "pruned %d done deliveries older than %g s (FALHOOK_RETENTION)",
                    deleted,
                    self.retention,
                    extra={"pruned": deleted},
                )

    def round(self) -> int:
        """Delete done deliveries past the retention, batch by batch (in a thread)."""
        deleted = 0
        for _ in range(_MAX_BATCHES):
            count = self.store.prune_batch(self.retention, BATCH)
            if count is None:  # another replica is pruning
                break
            deleted += count
            if count < BATCH:
                break
            time.sleep(_PAUSE)
        return deleted
