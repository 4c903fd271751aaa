"""Wake-ups across replicas: LISTEN for the store's NOTIFY and wake the local dispatcher.

Every PostgreSQL transaction that makes a delivery due (a new insert, a revived dead one,
a replay) sends ``NOTIFY falhook_deliveries``; whichever replica committed it wakes its own
dispatcher directly, and this listener wakes all the others. It is an optimisation only:
the dispatcher's poll fallback still finds everything, so a lost notification (the
listener reconnecting, the server restarting) costs latency, never a delivery.

One daemon thread with its own autocommit psycopg connection (not from the pool: a
LISTENing session must stay open). On any error it closes the connection and reconnects
with capped exponential backoff; after each (re)connect it wakes the dispatcher once,
since notifications sent while it was away are gone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy as sa

from falhook.receiver.retry import Backoff
from falhook.receiver.store.engine import NOTIFY_CHANNEL, PG_CONNECT_ARGS

__all__ = ["Listener", "libpq_conninfo"]

log = logging.getLogger("falhook.listener")


def libpq_conninfo(url: str) -> str:
    """A libpq connection string for a SQLAlchemy ``postgresql+psycopg://`` URL."""
    parsed = sa.make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


class Listener:
    """LISTEN on the store's channel in a thread; call `wake` on `loop` for each notify.

    ``start()`` must be called from the event loop that `wake` belongs to; ``await
    stop()`` ends the thread (within about `poll_interval` seconds).
    """

    def __init__(
        self,
        url: str,
        wake: Callable[[], None],
        *,
        channel: str = NOTIFY_CHANNEL,
        also: Mapping[str, Callable[[], None]] | None = None,
        poll_interval: float = 0.5,
        idle_check_seconds: float = 30.0,
        max_backoff: float = 5.0,
    ) -> None:
        self.conninfo = libpq_conninfo(url)
        self.wake = wake
        self.channel = channel
        # More channels on the same connection (one session per replica, not one each),
        # each with its own callback: e.g. the dispatch switch (store/control.py).
        self.also = dict(also or {})
        self.poll_interval = poll_interval
        self.idle_check_seconds = idle_check_seconds
        self.max_backoff = max_backoff
        self.connected = threading.Event()  # set while LISTENing (tests wait on it)
        self.notifications = 0  # received so far (for tests and metrics)
        self.connects = 0  # successful (re)connects so far
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conn: Any = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="falhook-listener", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        await asyncio.to_thread(thread.join)

    # -- the thread --------------------------------------------------------------------

    def _run(self) -> None:
        backoff = Backoff(0.1, self.max_backoff)
        while not self._stop.is_set():
            delay = backoff.first
            try:
                self._listen()
                backoff.succeeded()
            except Exception as exc:
                if self._stop.is_set():
                    break
                delay = backoff.failed()
                log.warning(
                    "LISTEN %s failed (reconnecting in %.1fs): %s", self.channel, delay, exc
                )
            finally:
                self.connected.clear()
                self._close()
            if self._stop.wait(delay):
                break

    def _listen(self) -> None:
        import psycopg  # the postgres extra; only PostgreSQL stores start a listener

        conn = psycopg.connect(self.conninfo, autocommit=True, **PG_CONNECT_ARGS)
        self._conn = conn
        for channel in (self.channel, *self.also):
            conn.execute(f"LISTEN {channel}")
        self.connects += 1
        self.connected.set()
        self._wake()  # anything committed while we were not listening
        for callback in self.also.values():
            self._call(callback)
        last_activity = time.monotonic()
        while not self._stop.is_set():
            got = 0
            others: set[str] = set()
            for notify in conn.notifies(timeout=self.poll_interval):
                if notify.channel == self.channel:
                    got += 1
                else:
                    others.add(notify.channel)
            if got:
                self.notifications += got
                self._wake()  # one wake for a burst: the dispatcher claims in batches
            for channel in others:
                self._call(self.also[channel])
            if got or others:
                last_activity = time.monotonic()
            elif time.monotonic() - last_activity > self.idle_check_seconds:
                # Quiet for a while: make sure the session is still alive (a failed round
                # trip raises, and _run reconnects).
                conn.execute("SELECT 1")
                last_activity = time.monotonic()

    def _wake(self) -> None:
        self._call(self.wake)

    def _call(self, callback: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(callback)
        except RuntimeError:
            self._stop.set()  # the loop is closed: nobody to wake

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                log.debug("could not close the listener connection", exc_info=True)
