"""What a fal key turns on: submit, expect, the recovery loop, and payload_error fetches.

`Recovery` belongs to a `WebhookReceiver` (``hooks.submit``, ``hooks.expect`` and their
sync twins call it); its loop runs while the receiver is started. It also works unstarted
(the CLI, a script): expectations are then written on a connection of their own, beside
any running ``falhook serve``.

The poller and the store are imported when it starts: ``falhook submit`` needs httpx and
expect.py only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from falhook.receiver.errors import (
    InvalidRequestError,
    QueueError,
    RecoveryDisabledError,
    StoreUnavailableError,
)
from falhook.receiver.recovery import expect
from falhook.receiver.recovery.client import QueueClient, outcome_of
from falhook.receiver.recovery.transitions import body_with_payload
from falhook.receiver.recovery.urls import request_urls, same_origin
from falhook.receiver.settings import WEBHOOK_PATH, Settings
from falhook.receiver.store.expectations import Expectations, ExpectationState, NewExpectation
from falhook.receiver.tracing import resolve as resolve_tracing

if TYPE_CHECKING:  # imported when started, not for submit
    from falhook.receiver.models import Delivery
    from falhook.receiver.recovery.poller import Poller
    from falhook.receiver.store import Claim, Store
    from falhook.receiver.tracing.spans import Submission, Tracing

__all__ = ["WEBHOOK_PATH", "Recovery"]

log = logging.getLogger("falhook.recovery")
_PRIORITIES = ("normal", "low")
# RFC 9110: a field name is a token; values here are fal's, printable ASCII.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEADER_VALUE = re.compile(r"[\x20-\x7e\t]*")


class Recovery:
    """Submit to fal's queue, expect results, and recover those no webhook brought."""

    def __init__(
        self,
        settings: Settings,
        *,
        observe_call: Callable[[str], None] | None = None,
        on_recovered: Callable[[], None] = lambda: None,
        on_settled: Callable[[str, ExpectationState, str | None], None] | None = None,
        migrate: bool = True,
        tracer_provider: Any = None,
    ) -> None:
        """`migrate`: an unstarted receiver's sync writes may create or upgrade the schema
        (its own start would); the CLI's may not (only `falhook serve` migrates).
        `tracer_provider`: the receiver's (see `WebhookReceiver`), for a submit made
        before it started."""
        if settings.fal_key is None:
            raise RecoveryDisabledError()
        self._on_settled = on_settled
        self.settings = settings
        self.client = QueueClient(
            settings.queue_url,
            settings.fal_key,
            observe=observe_call,
            max_answer_bytes=settings.max_body_bytes,
        )
        self._on_recovered = on_recovered
        self._migrate = migrate
        self._expectations: Expectations | None = None
        self._poller: Poller | None = None
        self._tracer_provider = tracer_provider
        self.tracing: Tracing | None = None
        self._traced = False  # tracing decided (by the receiver's start, or a first submit)

    def trace(self, tracing: Tracing | None) -> None:
        """Record spans (submit, calls to fal's queue, recoveries) with `tracing`."""
        self._traced = True
        self.tracing = self.client.tracing = tracing
        if self._poller is not None:
            self._poller.tracing = tracing

    @property
    def webhook_url(self) -> str | None:
        """Where fal should post results: FALHOOK_PUBLIC_URL + /webhooks/fal (None if unset:
        then results come only through recovery)."""
        base = self.settings.public_url
        return None if base is None else base + WEBHOOK_PATH

    # -- lifecycle (the receiver's) ----------------------------------------------------

    def start(self, store: Store) -> None:
        """Start the recovery loop on the receiver's open store."""
        from falhook.receiver.recovery.poller import Poller

        self._expectations = Expectations(store)
        self._poller = Poller(
            store,
            self._expectations,
            self.client,
            self.settings,
            on_recovered=self._on_recovered,
            on_settled=self._on_settled,
        )
        self._poller.tracing = self.tracing
        self._poller.start()

    async def stop(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None:
            await poller.stop()
        self._expectations = None
        await self.client.aclose()

    # -- expect ------------------------------------------------------------------------

    def new_expectation(
        self,
        request_id: str,
        endpoint_id: str,
        *,
        status_url: str | None = None,
        response_url: str | None = None,
        origin: str = "expect",
    ) -> NewExpectation:
        """Validate what ``expect`` was given (raises InvalidRequestError)."""
        return expect.new_expectation(
            request_id,
            endpoint_id,
            queue_url=self.settings.queue_url,
            status_url=status_url,
            response_url=response_url,
            origin=origin,
        )

    async def expect(
        self,
        request_id: str,
        endpoint_id: str,
        *,
        status_url: str | None = None,
        response_url: str | None = None,
    ) -> bool:
        """Expect a result for a request submitted elsewhere; True if newly recorded."""
        new = self.new_expectation(
            request_id, endpoint_id, status_url=status_url, response_url=response_url
        )
        return await self._record(new)

    def expect_sync(
        self,
        request_id: str,
        endpoint_id: str,
        *,
        status_url: str | None = None,
        response_url: str | None = None,
    ) -> bool:
        """`expect` for code without an event loop (writes on a connection of its own)."""
        new = self.new_expectation(
            request_id, endpoint_id, status_url=status_url, response_url=response_url
        )
        return self._record_sync(new)

    async def _record(self, new: NewExpectation) -> bool:
        expectations = self._expectations
        if expectations is None:  # not started: write beside whatever runs
            return await asyncio.to_thread(self._record_sync, new)
        recorded: bool = await expectations.run(
            expectations.op_add(
                new,
                recover_after=self.settings.recover_after_seconds,
                ttl=self.settings.expect_ttl_seconds,
            )
        )
        if self._poller is not None:
            self._poller.wake()
        expect.logged(new, recorded)
        return recorded

    def _record_sync(self, new: NewExpectation) -> bool:
        return expect.record_sync(self.settings, new, migrate=self._migrate)

    # -- submit ------------------------------------------------------------------------

    def _headers(
        self,
        priority: str | None,
        start_timeout: float | None,
        hint: str | None,
        headers: Mapping[str, str] | None,
        media_expiration: int | None = None,
    ) -> dict[str, str]:
        sent = dict(headers or {})
        expiration = media_expiration
        if expiration is None:
            expiration = self.settings.fal_media_expiration_seconds
        if expiration is not None:
            if not (isinstance(expiration, int) and expiration > 0):
                raise InvalidRequestError("media_expiration must be a whole number of seconds")
            # fal deletes the request's media this long after it is made (its default is
            # at least 7 days): shorter, for privacy and cost, once the archive keeps them.
            sent["X-Fal-Object-Lifecycle-Preference"] = json.dumps(
                {"expiration_duration_seconds": expiration}
            )
        if priority is not None:
            if priority not in _PRIORITIES:
                raise InvalidRequestError(f"priority must be normal or low, not {priority!r}")
            sent["X-Fal-Queue-Priority"] = priority
        if start_timeout is not None:
            if not start_timeout > 0:
                raise InvalidRequestError("start_timeout must be a positive number of seconds")
            sent["X-Fal-Request-Timeout"] = f"{start_timeout:g}"
        if hint is not None:
            sent["X-Fal-Runner-Hint"] = hint
        for name, value in sent.items():
            # httpx would raise deep in the call (UnicodeEncodeError, LocalProtocolError).
            if not _TOKEN.fullmatch(name):
                raise InvalidRequestError(f"{name!r} is not a header name")
            if not _HEADER_VALUE.fullmatch(value):
                raise InvalidRequestError(
                    f"header {name}: {value!r} is not a header value (printable ASCII only)"
                )
        return sent

    def _submitted(
        self, endpoint_id: str, answer: dict[str, Any], span: Submission | None
    ) -> NewExpectation:
        def fal_url(name: str) -> str | None:
            url = answer.get(name)
            # Only URLs on the queue's own host are kept (the key goes with every poll).
            if isinstance(url, str) and same_origin(url, self.settings.queue_url):
                return url
            return None

        new = self.new_expectation(
            answer["request_id"],
            endpoint_id,
            status_url=fal_url("status_url"),
            response_url=fal_url("response_url"),
            origin="submit",
        )
        if span is None:
            return new
        # Its processing, wherever and whenever it runs, links back to this span.
        span.message(new.request_id)
        return dataclasses.replace(new, trace_context=span.context)

    async def submit(
        self,
        endpoint_id: str,
        arguments: Any,
        *,
        priority: str | None = None,
        start_timeout: float | None = None,
        hint: str | None = None,
        headers: Mapping[str, str] | None = None,
        media_expiration: int | None = None,
    ) -> dict[str, Any]:
        """Submit to fal's queue with the webhook URL, expect the result, return fal's
        answer (``request_id`` first). Raises QueueError if fal did not take it."""
        self.new_expectation("-", endpoint_id)  # validate before calling fal
        sent = self._headers(priority, start_timeout, hint, headers, media_expiration)
        with self._submitting(endpoint_id) as span:
            answer = await self.client.submit(
                endpoint_id, arguments, webhook_url=self.webhook_url, headers=sent
            )
            new = self._submitted(endpoint_id, answer, span)
            try:
                await self._record(new)
            except StoreUnavailableError as exc:
                raise _unrecorded(new, exc) from exc
        return answer

    def submit_sync(
        self,
        endpoint_id: str,
        arguments: Any,
        *,
        priority: str | None = None,
        start_timeout: float | None = None,
        hint: str | None = None,
        headers: Mapping[str, str] | None = None,
        media_expiration: int | None = None,
    ) -> dict[str, Any]:
        """`submit` for code without an event loop."""
        self.new_expectation("-", endpoint_id)
        sent = self._headers(priority, start_timeout, hint, headers, media_expiration)
        with self._submitting(endpoint_id) as span:
            answer = self.client.submit_sync(
                endpoint_id, arguments, webhook_url=self.webhook_url, headers=sent
            )
            new = self._submitted(endpoint_id, answer, span)
            try:
                self._record_sync(new)
            except StoreUnavailableError as exc:
                raise _unrecorded(new, exc) from exc
        return answer

    def _submitting(self, endpoint_id: str) -> contextlib.AbstractContextManager[Submission | None]:
        """The submit's span (tracing on), in the caller's trace; else nothing."""
        if not self._traced:  # a script's submit, before (or without) the receiver's start
            self.trace(resolve_tracing(self._tracer_provider))
        if self.tracing is None:
            return contextlib.nullcontext()
        return self.tracing.submitting(endpoint_id)

    # -- payload_error: the payload fal could not send ---------------------------------

    async def prepare(self, claim: Claim, delivery: Delivery, last_attempt: bool) -> Delivery:
        """Fill in the payload of a ``payload_error`` delivery from fal's queue, when its
        request is expected (fal's webhook does not name the endpoint). The callback then
        sees the whole result and the original ``payload_error``. A request falhook does
        not know, or a result fal no longer has, is delivered as it came; a queue that
        cannot answer now raises (the attempt is retried), except on the last attempt."""
        expectations = self._expectations
        if expectations is None:
            return delivery
        expected = await expectations.run(expectations.op_get(delivery.request_id))
        if expected is None:
            return delivery
        from falhook.receiver.models import Delivery  # SQLModel: loaded by the app already

        response_url = (
            expected.response_url
            or request_urls(
                self.settings.queue_url, expected.endpoint_id, expected.request_id
            ).response_url
        )
        fields = {"request_id": delivery.request_id, "endpoint_id": expected.endpoint_id}
        try:
            answer = await self.client.get(response_url)
            failure = outcome_of(answer.status_code)
            self.client.count(failure)
            if failure is not None and failure.transient:
                raise QueueError(failure, f"result answered {answer.status_code}")
        except QueueError as exc:
            if exc.failure.transient and not last_attempt:
                raise  # this attempt fails; the retry asks the queue again
            log.warning("payload_error: %s; delivered without its payload", exc, extra=fields)
            return delivery
        if failure is not None or not isinstance(answer.body, dict):
            log.warning(
                "payload_error: fal's queue answered %s for the result; delivered without it",
                answer.status_code,
                extra=fields,
            )
            return delivery
        data = delivery.json()
        data["payload"] = answer.body  # payload_error stays: the callback sees what happened
        body = body_with_payload(data, answer.raw)
        await expectations.run(expectations.op_fill_body(delivery.request_id, claim.claim_id, body))
        await expectations.run(
            expectations.op_mark(
                delivery.request_id,
                ExpectationState.RECOVERED,
                "payload fetched from fal's queue (the webhook came with payload_error)",
            )
        )
        self._on_recovered()
        log.info("payload_error: payload fetched from fal's queue", extra=fields)
        return Delivery.from_body(
            body,
            attempt=delivery.attempt,
            received_at=delivery.received_at.timestamp(),
            user_id=delivery.user_id,
            parsed=data,
            source=delivery.source,
            signed_at=delivery.signed_at,
        )


def _unrecorded(new: NewExpectation, exc: StoreUnavailableError) -> StoreUnavailableError:
    return StoreUnavailableError(
        f"fal accepted request {new.request_id}, but its expectation could not be recorded "
        f"({exc}); once the store is back: falhook expect {new.request_id} "
        f"--endpoint {new.endpoint_id}"
    )
