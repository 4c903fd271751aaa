"""The dispatcher: claims due deliveries from the store and runs their callbacks.

Shaped like procrastinate's worker: a semaphore caps concurrency; between rounds it waits
for whichever comes first — a new insert (woken at once, no poll latency), a free slot,
the next delivery falling due, or the poll fallback. Every claim has a lease, renewed
while its callbacks run; a crashed process's claims are retaken when their leases expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, NamedTuple

from falhook.receiver.deadlines import Deadlines
from falhook.receiver.errors import StoreUnavailableError
from falhook.receiver.models import Delivery
from falhook.receiver.registry import CallbackRegistry, RunningCall
from falhook.receiver.retry import Backoff, Retry, RetryPolicy
from falhook.receiver.store import Claim, Store
from falhook.receiver.store.attempts import AttemptRecord
from falhook.receiver.store.records import column_text
from falhook.receiver.sync_runner import SyncRunner
from falhook.receiver.tracebacks import attempt_error

if TYPE_CHECKING:
    from falhook.receiver.tracing.spans import Tracing

__all__ = ["Dispatcher", "Drained"]

log = logging.getLogger("falhook.dispatcher")
_MAX_ERROR_CHARS = 4000


def _describe(exc: BaseException) -> str:
    """A delivery's last error, in one line; a callback's Retry says what it asked for."""
    if isinstance(exc, Retry):
        return _scheduled(exc)
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return column_text(text[:_MAX_ERROR_CHARS])  # a message may quote a body's NUL


def _scheduled(exc: Retry) -> str:
    after = "" if exc.after is None else f", after {exc.after:g} s"
    return column_text(f"retry asked by the callback{after}: {exc}"[:_MAX_ERROR_CHARS])


def _trace(exc: BaseException) -> str:
    """What an attempt records: a scheduled retry in one line (it is not an error), else
    the traceback with falhook's own frames folded."""
    if isinstance(exc, Retry):
        return _scheduled(exc)
    return column_text(attempt_error(exc))  # a message may quote a body's NUL


class Dispatcher:
    """Runs callbacks for stored deliveries, at least once each, with retries."""

    def __init__(
        self,
        store: Store,
        registry: CallbackRegistry,
        *,
        policy: RetryPolicy,
        lease_seconds: float,
        concurrency: int = 16,
        poll_seconds: float = 5.0,
        shutdown_timeout: float = 30.0,
        callback_timeout: float | None = None,
        deadlines: Deadlines | None = None,
        observer: DispatchObserver | None = None,
        prepare: Prepare | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.store = store
        self.tracing = tracing
        self.registry = registry
        self.policy = policy
        self.lease_seconds = lease_seconds
        self.concurrency = concurrency
        self.poll_seconds = poll_seconds
        self.shutdown_timeout = shutdown_timeout
        self.callback_timeout = callback_timeout
        self.deadlines = deadlines or Deadlines()
        self.observer = observer or DispatchObserver()
        self.prepare = prepare
        self._wake = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._stopping = False
        self._paused = False  # the store-wide switch, as last seen (receiver/pause.py)
        self._tasks: set[asyncio.Task[None]] = set()  # each delivery's attempt, until settled
        # Deliveries whose callbacks are running: the slots. A slot is free again as soon as
        # the callbacks return, not once the outcome is committed: recording it is ours to
        # do, and holding the slot for that (a commit or two) capped dispatch below what the
        # receiver ingests, so a backlog grew under load (bench/README, "Design figures").
        self._running = 0
        self._loop_task: asyncio.Task[None] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._held: dict[str, tuple[Claim, float]] = {}  # request_id -> (claim, last renewed)
        # Slots promised to requests whose deliveries are being inserted already claimed.
        self._reserved: set[str] = set()
        self._claim_prefix = uuid.uuid4().hex[:16] + "-"
        self._claim_numbers = itertools.count(1)
        # Sync callbacks past their timeout keep their threads (Python cannot stop one):
        # up to `concurrency` such abandoned threads run beside the pool's own at no cost
        # to dispatch (threads are started only when needed); each one beyond that takes a
        # slot until its callback returns, so their number stays bounded.
        self._abandoned = 0
        # Plain `def` callbacks: one thread hand-off per batch of deliveries, not per call.
        self._sync_runner = SyncRunner(2 * concurrency, carry_context=tracing is not None)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="falhook-dispatcher")
        self._renew_task = asyncio.create_task(self._renew_leases(), name="falhook-leases")

    def wake(self) -> None:
        """Something new was committed: look for due deliveries now."""
        self._wake.set()

    @property
    def paused(self) -> bool:
        return self._paused

    def pause(self) -> None:
        """Start no new callbacks (running ones finish, their leases are still renewed)."""
        self._paused = True

    def resume(self) -> None:
        """Claim again at once, at the normal concurrency."""
        if self._paused:
            self._paused = False
            self._wake.set()
            self._slot_free.set()  # the loop may be waiting on a free slot alone

    @property
    def free_slots(self) -> int:
        over = self._abandoned - self.concurrency
        return self.concurrency - self._running - len(self._reserved) - max(0, over)

    @property
    def abandoned_threads(self) -> int:
        """Sync callbacks past their timeout whose threads are still running."""
        return self._abandoned

    def reserve(self) -> str | None:
        """A claim id for a delivery about to be inserted, if a slot is free now.

        The delivery is then stored already claimed and dispatched as soon as it is
        committed (`adopt`), saving a claim round trip and a second parse of its body.
        Release the id (`release`) whether or not the insert took it.
        """
        if self._stopping or self._paused or self.free_slots <= 0:
            return None
        claim_id = f"{self._claim_prefix}{next(self._claim_numbers)}"
        self._reserved.add(claim_id)
        return claim_id

    def release(self, claim_id: str) -> None:
        """Give back a reservation the insert did not use (a duplicate, an error)."""
        if claim_id in self._reserved:
            self._reserved.discard(claim_id)
            self._slot_free.set()

    def adopt(self, claim: Claim) -> None:
        """Run callbacks for a delivery that was committed already claimed by us."""
        self._reserved.discard(claim.claim_id)
        self._spawn(claim)

    async def stop(self) -> Drained:
        """Stop claiming; let running callbacks finish for up to the shutdown timeout.

        Callbacks still running after that are cancelled; their deliveries stay claimed
        until the lease expires and are then retaken (by this or another process).
        Returns how many deliveries in flight finished and how many were cancelled.
        """
        self._stopping = True
        self._wake.set()
        if self._loop_task is not None:
            await asyncio.gather(self._loop_task, return_exceptions=True)
        in_flight, cancelled = len(self._tasks), 0
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=self.shutdown_timeout)
            cancelled = len(pending)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("shutdown: %d callbacks still running were cancelled", len(pending))
                await asyncio.gather(*pending, return_exceptions=True)
        if self._renew_task is not None:
            self._renew_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renew_task
        self._sync_runner.stop()
        return Drained(in_flight - cancelled, cancelled)

    # -- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = Backoff(0.05, self.poll_seconds)
        while not self._stopping:
            # Cleared before looking, not when about to sleep: a slot freed while the claim
            # below is in flight must still end the wait that follows it.
            self._slot_free.clear()
            free = 0 if self._paused else self.free_slots
            timeout = self.poll_seconds
            if free > 0:
                self._wake.clear()
                try:
                    batch = await self.store.claim(free, self.lease_seconds)
                except StoreUnavailableError as exc:
                    log.warning("dispatcher cannot claim (will retry): %s", exc)
                    timeout = backoff.failed()
                else:
                    backoff.succeeded()
                    for claim in batch.claims:
                        self._spawn(claim)
                    if len(batch.claims) == free:
                        continue  # there may be more due right now
                    if batch.next_due_at is not None:
                        timeout = min(timeout, max(0.0, batch.next_due_at - time.time()) + 0.001)
            await self._wait(wait_seconds=timeout, can_claim=free > 0)

    async def _wait(self, *, wait_seconds: float, can_claim: bool) -> None:
        events = [self._slot_free.wait()]
        if can_claim:
            events.append(self._wake.wait())
        waiters = [asyncio.ensure_future(e) for e in events]
        try:
            await asyncio.wait(waiters, timeout=wait_seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()

    def _spawn(self, claim: Claim) -> None:
        self._running += 1
        task = asyncio.create_task(self._handle(claim), name=f"falhook-deliver-{claim.request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, claim: Claim) -> None:
        tracing = self.tracing
        if tracing is None:
            await self._deliver(claim)
            return
        with tracing.processing(
            claim.request_id, claim.attempt, claim.source, claim.trace_context
        ) as span:
            tracing.settled(span, await self._deliver(claim))

    async def _deliver(self, claim: Claim) -> str:
        try:
            attempt = await self._attempt(claim)
        finally:
            self._slot_freed()  # the callbacks are over (or never ran): the slot is free
        return await self._settle(claim, attempt)

    async def _attempt(self, claim: Claim) -> _Attempt:
        """Run the delivery's callbacks."""
        started_at, began = time.time(), time.perf_counter()
        try:
            delivery = Delivery.from_body(
                claim.body,
                attempt=claim.attempt,
                received_at=claim.received_at,
                user_id=claim.user_id,
                parsed=claim.parsed,
                source=claim.source,
                signed_at=claim.signed_at,
            )
        except Exception as exc:
            # Bodies were validated before they were stored; this is a corrupt row.
            self._traced_failure(exc)
            unreadable = f"stored body unreadable: {exc!r}"
            record = AttemptRecord(claim.attempt, started_at, 0.0, unreadable)
            return _Attempt(False, unreadable, (), None, None, record)
        self._held[claim.request_id] = (claim, time.monotonic())
        if self.prepare is not None and delivery.payload is None and delivery.payload_error:
            # fal could not send the payload: recovery fetches it from the queue first, so
            # the callbacks see the whole result (receiver/recovery/). A queue that cannot
            # answer now fails this attempt, to be retried like a failed callback.
            try:
                delivery = await self.prepare(
                    claim, delivery, self.policy.gives_up_after(claim.attempt)
                )
            except Exception as exc:
                self._traced_failure(exc)
                self._held.pop(claim.request_id, None)
                why = f"payload not fetched from fal's queue yet: {_describe(exc)}"
                lease_ends = time.monotonic() + self.lease_seconds
                record = AttemptRecord(
                    claim.attempt, started_at, time.perf_counter() - began, _trace(exc)
                )
                return _Attempt(False, why, claim.completed_callbacks, None, lease_ends, record)
        try:
            self.observer.started(delivery)
            completed, error = await self.registry.run(
                delivery,
                claim.completed_callbacks,
                self._sync_runner,
                timeout=self.callback_timeout,
                deadlines=self.deadlines,
                on_timeout=lambda name, thread: self._timed_out(claim, name, thread),
                on_called=self.observer.called,
            )
        finally:
            held = self._held.pop(claim.request_id, None)
        retry_after = error.after if isinstance(error, Retry) else None
        description = None if error is None else _describe(error)
        if error is not None:
            self._traced_failure(error)
        lease_ends = (held[1] if held else time.monotonic()) + self.lease_seconds
        record = AttemptRecord(
            claim.attempt,
            started_at,
            time.perf_counter() - began,
            None if error is None else _trace(error),
        )
        return _Attempt(error is None, description, completed, retry_after, lease_ends, record)

    def _traced_failure(self, exc: BaseException) -> None:
        if self.tracing is not None:
            self.tracing.failed(exc)  # on the attempt's span, current in this task

    def _timed_out(self, claim: Claim, name: str, thread: RunningCall | None) -> None:
        self.observer.timed_out(name)
        if thread is None:
            log.warning(
                "callback %s on %s timed out after %g s (attempt %d): cancelled",
                name,
                claim.request_id,
                self.callback_timeout,
                claim.attempt,
            )
            return
        self._abandoned += 1
        loop = asyncio.get_running_loop()

        def returned(_: Any) -> None:  # in the abandoned thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                loop.call_soon_threadsafe(self._thread_returned, name)

        thread.add_done_callback(returned)
        level = logging.ERROR if self._abandoned > self.concurrency else logging.WARNING
        log.log(
            level,
            "callback %s on %s timed out after %g s (attempt %d): its thread cannot be "
            "stopped and is abandoned (%d abandoned%s)",
            name,
            claim.request_id,
            self.callback_timeout,
            claim.attempt,
            self._abandoned,
            "; each beyond FALHOOK_CONCURRENCY takes a dispatch slot"
            if self._abandoned > self.concurrency
            else "",
        )
        self.observer.abandoned(self._abandoned)

    def _thread_returned(self, name: str) -> None:
        self._abandoned -= 1
        log.info("an abandoned callback thread (%s) returned at last", name)
        self.observer.abandoned(self._abandoned)
        self._slot_free.set()

    def _slot_freed(self) -> None:
        self._running -= 1
        self._slot_free.set()

    async def _settle(self, claim: Claim, attempt: _Attempt) -> str:
        """Record an attempt's outcome, retrying while our lease still holds.

        A store outage of a few seconds (a database restart, a dropped connection) must
        not cost a whole lease: the outcome is written as soon as the store is back. If
        the lease runs out first, the delivery is retaken and its callbacks run again —
        at least once, never zero times.
        """
        backoff: Backoff | None = None  # made only when needed: most settle at once
        while True:
            try:
                kept, outcome, next_at = await self._record(claim, attempt)
                break
            except StoreUnavailableError as exc:
                ends = attempt.lease_ends
                backoff = backoff or Backoff(0.05, 1.0)
                pause = backoff.failed()
                if ends is None or time.monotonic() + pause >= ends:
                    log.warning("could not record outcome of %s: %s", claim.request_id, exc)
                    self.observer.finished(claim, "unrecorded", attempt.error)
                    return "unrecorded"
                await asyncio.sleep(pause)
        if not kept:
            log.warning(
                "lost the claim on %s (lease expired and retaken); outcome %s not recorded",
                claim.request_id,
                outcome,
            )
            outcome, next_at = "fenced", None
        elif outcome == "retry":
            # The claim loop may be asleep until the next poll: it last looked while this
            # delivery was still running (its slot is freed before the outcome is written).
            # Wake it, so it sees the retry's due time and sleeps only until then.
            self._wake.set()
        self.observer.finished(claim, outcome, attempt.error, next_attempt_at=next_at)
        return outcome

    async def _record(self, claim: Claim, attempt: _Attempt) -> tuple[bool, str, float | None]:
        """Write the outcome, and the attempt with it; (claim kept, outcome, retry due at)."""
        ok, error, completed, retry_after, _, record = attempt
        if ok:
            return await self.store.finish(claim, completed, attempt=record), "done", None
        if self.policy.gives_up_after(claim.attempt):
            kept = await self.store.bury(claim, error or "failed", completed, attempt=record)
            return kept, "dead", None
        delay = retry_after if retry_after is not None else self.policy.delay(claim.attempt)
        due_at = time.time() + delay
        kept = await self.store.reschedule(
            claim, due_at, error or "failed", completed, attempt=record
        )
        return kept, "retry", due_at

    async def _renew_leases(self) -> None:
        """One task renews every claim held for a third of a lease (not a task per claim:
        most callbacks finish long before their lease needs renewing)."""
        interval = self.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            cutoff = time.monotonic() - interval
            for claim, since in list(self._held.values()):
                if since > cutoff or claim.request_id not in self._held:
                    continue
                try:
                    if await self.store.renew(claim, self.lease_seconds):
                        self._held[claim.request_id] = (claim, time.monotonic())
                    else:
                        log.warning(
                            "claim on %s was lost while its callbacks ran", claim.request_id
                        )
                        self._held.pop(claim.request_id, None)
                except StoreUnavailableError as exc:
                    log.warning("could not renew the lease on %s: %s", claim.request_id, exc)


class Drained(NamedTuple):
    """What stopping did with the deliveries whose callbacks were in flight."""

    finished: int  # settled within the shutdown timeout
    cancelled: int  # still running at the timeout: retaken when their leases expire


# Runs before a delivery's callbacks when fal sent it without its payload (payload_error):
# (claim, delivery, last attempt?) -> the delivery the callbacks get.
Prepare = Callable[[Claim, Delivery, bool], Awaitable[Delivery]]


class _Attempt(NamedTuple):
    """What running a delivery's callbacks came to, for recording."""

    ok: bool
    error: str | None  # the first failure, described
    completed: list[str] | tuple[str, ...]  # callbacks that have now succeeded
    retry_after: float | None  # asked for by a callback's Retry(after=)
    lease_ends: float | None  # retry recording until then (monotonic clock)
    record: AttemptRecord  # kept in the attempts table with the outcome


class DispatchObserver:
    """Hooks for metrics and logs; the default does nothing."""

    def started(self, delivery: Delivery) -> None:
        """A delivery's callbacks are about to run."""

    def finished(
        self,
        claim: Claim,
        outcome: str,
        error: str | None,
        *,
        next_attempt_at: float | None = None,
    ) -> None:
        """An attempt ended: outcome is done, retry (due again at `next_attempt_at`),
        dead, fenced or unrecorded."""

    def timed_out(self, callback: str) -> None:
        """A callback did not return within its timeout."""

    def called(self, callback: str, seconds: float, outcome: str) -> None:
        """One callback returned (ok), raised (error) or timed out, after `seconds`."""

    def abandoned(self, threads: int) -> None:
        """The number of abandoned callback threads still running changed."""
