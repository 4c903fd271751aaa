"""Signature checks in a thread of their own, beside the event loop.

libsodium releases the GIL while it checks an Ed25519 signature, and so does hashlib
while it hashes a body of 2 KiB or more; together they are the largest single cost of
accepting a delivery. On the event loop that is time the loop cannot spend reading
requests (and each GIL release there lets another thread in, which the loop then waits
behind); here it overlaps with the loop on a second core. Checks are handed over in
batches: the first one queued after the thread ran dry wakes it, it takes everything
queued by then, and the results go back to each loop in one `call_soon_threadsafe`, so a
busy receiver pays one thread wake-up and one loop wake-up per batch, not per delivery
(bench/README, "Design figures").
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterable

from falhook.verify import PublicKey, VerifiedWebhook, WebhookHeaders
from falhook.verify.message import Prepared, first_match, prepare_body

__all__ = ["Checked", "SignatureThread"]

# The prepared message (kept for a retry with refreshed keys) and the result, or None
# when no key verified it.
Checked = tuple[Prepared, VerifiedWebhook | None]
_Job = tuple["asyncio.Future[Checked]", WebhookHeaders, bytes, Iterable[PublicKey]]
_Outcome = tuple["asyncio.Future[Checked]", Checked | None, BaseException | None]


class SignatureThread:
    """`check` runs `prepare_body` and `first_match` in a thread started on first use."""

    def __init__(self, name: str = "falhook-verify") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._queued: list[_Job] = []
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def check(
        self, checked: WebhookHeaders, body: bytes, keys: Iterable[PublicKey]
    ) -> asyncio.Future[Checked]:
        """Check ``body`` against headers `check_headers` passed, with ``keys``.

        The future raises WebhookVerificationError for a message that cannot be built.
        """
        future: asyncio.Future[Checked] = asyncio.get_running_loop().create_future()
        with self._lock:
            if self._stopping:
                raise RuntimeError("the signature thread is stopped")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._queued.append((future, checked, body, keys))
            if len(self._queued) == 1:
                self._ready.set()
        return future

    def stop(self) -> None:
        """Finish what is queued, then end the thread (idempotent)."""
        with self._lock:
            self._stopping = True
            thread = self._thread
            self._ready.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def _run(self) -> None:
        while True:
            self._ready.wait()
            with self._lock:
                batch, self._queued = self._queued, []
                self._ready.clear()
                stopping = self._stopping
            by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
            for future, checked, body, keys in batch:
                outcome: _Outcome
                try:
                    prepared = prepare_body(checked, body)
                    outcome = (future, (prepared, first_match(prepared, keys)), None)
                except BaseException as exc:  # handed to the awaiting request
                    outcome = (future, None, exc)
                by_loop.setdefault(future.get_loop(), []).append(outcome)
            for loop, outcomes in by_loop.items():
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                    loop.call_soon_threadsafe(_settle, outcomes)
            if stopping:  # nothing can be queued once stopping is seen under the lock
                return


def _settle(outcomes: list[_Outcome]) -> None:
    for future, result, error in outcomes:
        if future.done():  # the request was cancelled (client gone, deadline)
            continue
        if error is not None:
            future.set_exception(error)
        else:
            assert result is not None
            future.set_result(result)
