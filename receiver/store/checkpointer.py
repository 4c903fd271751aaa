"""The SQLite WAL checkpointer: copies the WAL into the database file off the commit path."""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

import sqlalchemy as sa

from falhook.receiver.store.engine import brief
from falhook.receiver.store.fileguard import FileGuard

__all__ = ["Checkpointer"]

log = logging.getLogger("falhook.store")


class Checkpointer:
    """Copies the SQLite WAL back into the database file from a thread of its own.

    With SQLite's default, the commit that grows the WAL past 1000 pages runs the
    checkpoint itself: every few hundred deliveries, one batch of acknowledgements would
    wait for a burst of writes and fsyncs (the p99 showed it). PASSIVE
    checkpoints here never block the writer, and durability is unchanged: a commit is
    durable once its WAL frames are synced, checkpointed or not. Once a second (rather
    than every 0.2 s) measured as well or better: fewer fsyncs of the database file
    contending with the WAL's.

    A concurrent checkpoint alone never lets the WAL start over under steady load: SQLite
    rewinds the WAL only when a write transaction begins with every frame already copied,
    and by the time this thread is done the writer has appended more. The WAL then grew
    for as long as the load lasted, and every commit paid for extending the file (page
    zeroing, visible in perf). So after each
    checkpoint the writer copies the few frames appended since, between two transactions
    (`catch_up`), and its next transaction rewinds the WAL. That makes one batch wait, so
    this thread first passes again until a pass finds only a few new frames, which makes
    the writer's catch-up an order of magnitude shorter (bench/README, "Design figures").
    """

    INTERVAL = 1.0
    MAX_PASSES = 6
    CATCH_UP_FRAMES = 64

    def __init__(
        self, engine: sa.Engine, interval: float | None = None, *, guard: FileGuard | None = None
    ) -> None:
        self._engine = engine
        # A checkpoint writes through the -shm mapping: into files that cannot be written
        # that is a SIGBUS, so it waits while the writer's guard says they are unwritable.
        self._guard = guard
        self._interval = self.INTERVAL if interval is None else interval
        self._commits = 0
        self.checkpoints = 0  # completed by this thread
        self.catch_up_due = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def committed(self) -> None:
        self._commits += 1

    def catch_up(self, conn: Any) -> None:
        """On the writer's connection, between transactions: copy what the last checkpoint
        missed, so that the next transaction rewinds the WAL."""
        if not self.catch_up_due:
            return
        self.catch_up_due = False
        try:
            self._pass(conn)
        except Exception as exc:
            log.debug("WAL catch-up checkpoint failed: %s", brief(exc))

    def _pass(self, conn: Any) -> int:
        """One PASSIVE checkpoint; returns how many frames the WAL held when it began."""
        row = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return int(row[1])

    def _converge(self, conn: Any) -> None:
        # Pass again while the writer appended much during the last pass, so that what is
        # left for the writer's own catch-up (which makes one batch wait) is small.
        frames = self._pass(conn)
        for _ in range(self.MAX_PASSES):
            more = self._pass(conn)
            if more < frames or more - frames <= self.CATCH_UP_FRAMES:
                break  # rewound meanwhile, or only a few frames appended
            frames = more
        self.checkpoints += 1
        self.catch_up_due = True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="falhook-checkpoint", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        seen = 0
        fairy: Any = None
        while not self._stop.wait(self._interval):
            if self._commits == seen:
                continue
            if self._guard is not None and self._guard.unwritable() is not None:
                continue  # tried again once they are writable (the writer logs it)
            seen = self._commits
            try:
                if fairy is None:
                    fairy = self._engine.raw_connection()
                self._converge(fairy.driver_connection)
            except Exception as exc:
                # The writer's own commits still succeed; the next round tries again.
                log.warning("WAL checkpoint failed: %s", brief(exc))
                if fairy is not None:
                    with contextlib.suppress(Exception):
                        fairy.invalidate()
                    fairy = None
        if fairy is not None:
            if self._guard is not None and self._guard.unwritable() is not None:
                return  # neither a pass nor a close (which checkpoints): see FileGuard
            with contextlib.suppress(Exception):
                self._pass(fairy.driver_connection)
                fairy.close()
