"""The recovery loop: poll fal's queue for expected requests no webhook brought.

Run by the receiver's lifespan when a fal key is configured. Each round it

1. sweeps (every few seconds): expectations whose delivery is stored become ``arrived``
   (``recovered`` when the delivery came from the queue), and those past their TTL
   ``expired`` — so the webhook's own path never touches the expectations table;
2. claims due expectations (leased and fenced; on PostgreSQL ``FOR UPDATE SKIP LOCKED``,
   so replicas share the work and never poll one request twice at once);
3. for each: a delivery is stored → settled; fal said COMPLETED at least the grace ago →
   fetch the result and store it through the same insert (dedupe) and dispatch path as a
   webhook; otherwise → poll the status, and reschedule with backoff (1 s doubling up to
   ``FALHOOK_RECOVER_POLL_SECONDS``), or wait the grace once COMPLETED.

Gentle with fal: at most a few calls at once, each expectation backs off, a 429 (with its
Retry-After, at most a minute) or an unreachable/failing queue pauses every poll of this
process, and 401, 403, 404 and a result no longer stored end the expectation ``failed`` at
once. Any other answer is asked again until the expectation's TTL. Each expectation is
worked in a task of its own: a call that hangs (each has a deadline) holds one slot, never
the loop, so the others are claimed and polled meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from falhook.receiver.errors import QueueError, QueueFailure, StoreUnavailableError
from falhook.receiver.models import SOURCE_QUEUE
from falhook.receiver.recovery.client import CALL_DEADLINE, QueueAnswer, QueueClient
from falhook.receiver.recovery.transitions import (
    QueueStatus,
    delivery_body,
    poll_delay,
    read_status,
)
from falhook.receiver.recovery.urls import request_urls
from falhook.receiver.settings import Settings
from falhook.receiver.store import NewDelivery, Store
from falhook.receiver.store.expectations import (
    Changes,
    ExpectationClaim,
    Expectations,
    ExpectationState,
)
from falhook.receiver.store.records import column_text

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = ["Poller"]

log = logging.getLogger("falhook.recovery")

CONCURRENCY = 4  # expectations worked (calls to fal's queue) at once, per process
SWEEP_SECONDS = 5.0  # how often expectations are matched with stored deliveries
# A delivery's received_at is taken before its commit, and replicas' clocks differ: each
# sweep looks this far behind the previous one's start.
SWEEP_MARGIN = 30.0
MAX_IDLE = 5.0  # look for due work at least this often (others may record expectations)
MIN_LEASE = 2 * CALL_DEADLINE + 10.0  # a claim outlives a status call and a result fetch
STOP_SECONDS = 5.0  # on shutdown, let the round under way finish for this long
TTL_REASON = "ttl: no result within FALHOOK_EXPECT_TTL_SECONDS"
S = ExpectationState
T = TypeVar("T")

if TYPE_CHECKING:
    from falhook.receiver.tracing.spans import Tracing


class Poller:
    """Claims due expectations and recovers their results from fal's queue."""

    def __init__(
        self,
        store: Store,
        expectations: Expectations,
        client: QueueClient,
        settings: Settings,
        *,
        on_recovered: Callable[[], None] = lambda: None,
        on_settled: Callable[[str, ExpectationState, str | None], None] | None = None,
    ) -> None:
        self.store = store
        self._on_settled = on_settled  # told of each expectation that failed or expired
        self.expectations = expectations
        self.client = client
        self.settings = settings
        self.poll_cap = settings.recover_poll_seconds
        self.grace = settings.recover_grace_seconds
        self.lease = max(settings.lease_seconds, MIN_LEASE)
        self.sweep_seconds = min(SWEEP_SECONDS, self.poll_cap)
        self.max_idle = min(MAX_IDLE, self.poll_cap)
        self._on_recovered = on_recovered
        self._wake = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._not_before = 0.0  # no call to fal before this (a 429, an outage)
        self._working: set[asyncio.Task[None]] = set()  # one per claimed expectation
        # request_id -> claim_id while worked on; a cancelled one stays, to be released
        self._held: dict[str, str] = {}
        self.tracing: Tracing | None = None  # set by Recovery with tracing on

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="falhook-recovery")

    def wake(self) -> None:
        """An expectation was recorded (or is due now): look at once."""
        self._wake.set()

    async def stop(self) -> None:
        """Let the expectations under way finish (up to a few seconds), then give back the
        claims of those that did not, so that they are due again at the next start."""
        self._stopping = True
        self._wake.set()
        task, self._task = self._task, None
        if task is None:
            return
        deadline = time.monotonic() + STOP_SECONDS
        await _finish({task}, STOP_SECONDS)
        await _finish(set(self._working), max(0.0, deadline - time.monotonic()))
        if self._held:
            with contextlib.suppress(StoreUnavailableError):
                await self.expectations.run(self.expectations.op_release(list(self._held.values())))

    # -- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        since: float | None = None  # the first sweep checks every active expectation
        next_sweep = 0.0
        backoff = 0.1
        while not self._stopping:
            # Cleared before looking, not before sleeping: a wake-up that comes while this
            # round runs (an expectation finished, one was recorded) is not lost.
            self._wake.clear()
            try:
                now = time.time()
                if now >= next_sweep:
                    await self._sweep(since)
                    since, next_sweep = now - SWEEP_MARGIN, now + self.sweep_seconds
                wait = self.max_idle
                free = CONCURRENCY - len(self._working)
                if now < self._not_before:
                    wait = self._not_before - now
                elif free > 0:  # else: a finishing expectation wakes the loop
                    claims, next_due = await self.expectations.run(
                        self.expectations.op_claim(limit=free, lease_seconds=self.lease)
                    )
                    for claim in claims:
                        self._start(claim)
                    if len(claims) < free and next_due is not None:
                        wait = min(wait, max(0.0, next_due - time.time()) + 0.001)
                wait = min(wait, max(0.0, next_sweep - time.time()))
                backoff = 0.1
            except StoreUnavailableError as exc:
                log.warning("recovery cannot reach the store (will retry): %s", exc)
                wait, backoff = backoff, min(backoff * 2, self.max_idle)
            except Exception:
                # A bug of ours must not end recovery for the life of the process.
                log.exception("recovery round failed (will retry)")
                wait, backoff = backoff, min(backoff * 2, self.max_idle)
            await self._sleep(wait)

    async def _sleep(self, seconds: float) -> None:
        if self._stopping:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=max(seconds, 0.0))

    async def _sweep(self, since: float | None) -> None:
        swept = await self.expectations.run(
            self.expectations.op_sweep(since=since, ttl_reason=TTL_REASON)
        )
        for request_id, state in swept.settled.items():
            self._told(request_id, state, TTL_REASON if state is S.EXPIRED else None)
            level = logging.WARNING if state is S.EXPIRED else logging.INFO
            log.log(
                level,
                "expectation %s",
                state.value,
                extra={
                    "request_id": request_id,
                    "state": state.value,
                    "reason": TTL_REASON if state is S.EXPIRED else None,
                },
            )

    def _start(self, claim: ExpectationClaim) -> None:
        self._held[claim.request_id] = claim.claim_id
        task = asyncio.create_task(self._one(claim), name=f"falhook-recovery-{claim.request_id}")
        self._working.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._working.discard(task)
        self._wake.set()  # a slot is free

    async def _one(self, claim: ExpectationClaim) -> None:
        try:
            await self._handle(claim)
        except asyncio.CancelledError:
            raise  # stopping: its claim stays held, and stop() gives it back
        except StoreUnavailableError as exc:
            # Its lease expires and it is retaken (here or by another replica).
            log.warning("could not record recovery of %s: %s", claim.request_id, exc)
        except Exception:
            # A bug of ours: this one is retaken when its lease expires; the others go on.
            log.exception("recovery of %s failed", claim.request_id)
        self._held.pop(claim.request_id, None)

    # -- one expectation ---------------------------------------------------------------

    async def _handle(self, claim: ExpectationClaim) -> None:
        exp = claim.expectation
        if claim.delivered is not None:
            state = await self.expectations.run(self.expectations.op_settle_delivered(claim))
            self._settled(claim, state, None)
            return
        now = time.time()
        if now < self._not_before:
            # Paused (rate limited, or the queue is failing): put it back untouched.
            await self._update(claim, S(exp.state), due_at=self._not_before)
            return
        if exp.completed_at is not None and now >= exp.completed_at + self.grace:
            await self._fetch(claim, exp.queue_error)
            return
        if exp.state == S.WAITING.value:
            # Its first poll: the line that says recovery started for it (also the first
            # this log shows of one recorded by `falhook expect` or `submit`).
            log.info(
                "expectation polling: no delivery yet, asking fal's queue",
                extra={
                    "request_id": claim.request_id,
                    "endpoint_id": exp.endpoint_id,
                    "origin": exp.origin,
                    "state": S.POLLING.value,
                },
            )
        urls = self._urls(claim)
        try:
            status = await self._ask(urls[0], read_status)
        except QueueError as exc:
            await self._call_failed(claim, exc, gone_means=QueueFailure.NOT_FOUND)
            return
        if not status.completed:
            await self._update(
                claim,
                S.POLLING,
                due_at=time.time() + poll_delay(exp.polls + 1, self.poll_cap),
                polled=True,
                queue_status=status.status,
            )
            return
        await self._completed(claim, status)

    async def _completed(self, claim: ExpectationClaim, status: QueueStatus) -> None:
        log.info(
            "expectation: fal completed the request, no delivery yet",
            extra={
                "request_id": claim.request_id,
                "endpoint_id": claim.expectation.endpoint_id,
                "state": S.POLLING.value,
                "queue_error": status.error,
                "grace_seconds": self.grace,
            },
        )
        if self.grace > 0:
            now = time.time()
            await self._update(
                claim,
                S.POLLING,
                due_at=now + self.grace,
                polled=True,
                queue_status=status.status,
                completed_at=now,
                queue_error=status.error_json(),
            )
            return
        await self._fetch(claim, status.error_json())

    async def _fetch(self, claim: ExpectationClaim, queue_error: str | None) -> None:
        request_id = claim.request_id
        received_in = None
        try:
            if self.tracing is None:
                body = await self._ask(
                    self._urls(claim)[1],
                    lambda answer: delivery_body(request_id, queue_error, answer),
                )
            else:
                # A message received: its processing links to this span.
                with self.tracing.recovering(request_id, claim.expectation.endpoint_id) as span:
                    body = await self._ask(
                        self._urls(claim)[1],
                        lambda answer: delivery_body(request_id, queue_error, answer),
                    )
                    received_in = span.context
        except QueueError as exc:
            await self._call_failed(claim, exc, gone_means=QueueFailure.RESULT_GONE)
            return
        new = NewDelivery(
            request_id=request_id,
            gateway_request_id=request_id,
            status=body.status,
            error=None if body.error is None else column_text(body.error),
            payload_error=None,
            user_id=None,
            body=body.body,
            received_at=time.time(),
            source=SOURCE_QUEUE,
            trace_context=received_in,
        )
        # The webhook's own insert: a delivery already stored makes this a duplicate (the
        # webhook won the race), and a webhook after this one is the duplicate.
        is_new = await self.store.insert(new)
        if is_new:
            self._on_recovered()
        reason = f"fetched from fal's queue ({body.status})" if is_new else None
        state = await self.expectations.run(
            self.expectations.op_settle_delivered(claim, reason=reason)
        )
        self._settled(claim, state, reason)

    async def _call_failed(
        self, claim: ExpectationClaim, exc: QueueError, *, gone_means: QueueFailure
    ) -> None:
        exp = claim.expectation
        failure = exc.failure
        if failure is QueueFailure.NOT_FOUND:
            failure = gone_means
        # fal answered some other 4xx (not a model's error): asked again until the TTL,
        # since giving up loses a result fal may still have.
        answered = failure is QueueFailure.REJECTED and exc.status_code is not None
        if failure.transient or answered:
            delay = poll_delay(exp.polls + 1, self.poll_cap)
            if exc.retry_after is not None:
                delay = max(delay, exc.retry_after)
            if failure.everyones:
                self._not_before = max(self._not_before, time.time() + delay)
            said = str(exc)  # "fal's queue is unreachable: …" or "status answered 503: …"
            log.warning(
                "%s (retrying in %.3g s)",
                said if said.startswith("fal's queue") else f"fal's queue: {said}",
                delay,
                extra={"request_id": claim.request_id, "outcome": failure.value},
            )
            await self._update(
                claim, S.POLLING, due_at=time.time() + delay, polled=True, reason=str(exc)
            )
            return
        reason = f"{failure.value}: {exc}"
        if await self._update(claim, S.FAILED, reason=reason):
            self._settled(claim, S.FAILED, reason)

    # -- helpers -----------------------------------------------------------------------

    async def _ask(self, url: str, read: Callable[[QueueAnswer], T]) -> T:
        """GET `url` and read the answer; counted by what it meant (a model's error
        fetched as a result is ok; a 200 that says nothing usable is bad_answer)."""
        answer = await self.client.get(url)
        try:
            result = read(answer)
        except QueueError as exc:
            self.client.count(exc.failure)
            raise
        self.client.count(None)
        return result

    def _urls(self, claim: ExpectationClaim) -> tuple[str, str]:
        exp = claim.expectation
        if exp.status_url and exp.response_url:
            return exp.status_url, exp.response_url
        built = request_urls(self.client.queue_url, exp.endpoint_id, exp.request_id)
        return exp.status_url or built.status_url, exp.response_url or built.response_url

    async def _update(
        self, claim: ExpectationClaim, state: ExpectationState, **changes: Unpack[Changes]
    ) -> bool:
        kept: bool = await self.expectations.run(
            self.expectations.op_update(claim, state, **changes)
        )
        if not kept:
            log.info(
                "expectation %s was settled or retaken meanwhile",
                claim.request_id,
                extra={"request_id": claim.request_id},
            )
        return kept

    def _told(self, request_id: str, state: ExpectationState, reason: str | None) -> None:
        if self._on_settled is not None and state in (S.FAILED, S.EXPIRED):
            self._on_settled(request_id, state, reason)

    def _settled(
        self, claim: ExpectationClaim, state: ExpectationState | None, reason: str | None
    ) -> None:
        if state is None:
            return
        self._told(claim.request_id, state, reason)
        level = logging.WARNING if state in (S.FAILED, S.EXPIRED) else logging.INFO
        log.log(
            level,
            "expectation %s",
            state.value,
            extra={
                "request_id": claim.request_id,
                "endpoint_id": claim.expectation.endpoint_id,
                "state": state.value,
                "reason": reason,
                "polls": claim.expectation.polls,
            },
        )


async def _finish(tasks: set[asyncio.Task[None]], seconds: float) -> None:
    """Wait up to `seconds` for `tasks`, then cancel what is still running."""
    if not tasks:
        return
    _, pending = await asyncio.wait(tasks, timeout=seconds) if seconds > 0 else (set(), tasks)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
