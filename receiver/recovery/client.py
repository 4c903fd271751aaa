"""A small client for fal's queue REST API: submit, status, result.

Why httpx and not fal-client (fal's SDK): httpx is already a dependency; fal-client
builds ``https://`` URLs from ``FAL_QUEUE_RUN_HOST`` (so it cannot be pointed at an
``http://`` loopback queue in tests, nor at ``FALHOOK_QUEUE_URL``), reads its key from the
process environment rather than our settings, and turns fal's answers into its own
exceptions — while recovery must see the raw answer (401, 403, 404, 429 with Retry-After,
5xx, an error body with ``error_type``) to decide what an expectation becomes. The API is
three REST calls; the client below is all of it.

Every call is counted in ``falhook_queue_requests_total{outcome}``. The fal key is sent
only to ``FALHOOK_QUEUE_URL``'s own host. A status or result answer is read as it streams
in, up to a limit (a delivery's, FALHOOK_MAX_BODY_BYTES): never more is buffered, and a
larger one is ``result_too_large``. One over 256 KiB is parsed in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import httpx

from falhook.receiver.errors import QueueError, QueueFailure
from falhook.receiver.recovery.urls import same_origin, submit_url
from falhook.receiver.store.records import column_text

if TYPE_CHECKING:
    from falhook.receiver.tracing.spans import Tracing

__all__ = ["MAX_ANSWER_BYTES", "QueueAnswer", "QueueClient", "outcome_of", "retry_after_seconds"]

R = TypeVar("R")

# Connecting should be quick; a result may be megabytes of JSON.
TIMEOUT = httpx.Timeout(10.0, read=30.0)
# httpx's read timeout starts again with every byte: a queue trickling a byte every few
# seconds would hold a call (and a recovery slot) for ever. So each call has a deadline.
CALL_DEADLINE = 45.0
# fal keeps results of 10 KB or more about 6 minutes: a Retry-After obeyed for an hour
# would let them go. Longer (or unreadable: inf, NaN) ones are read as this.
MAX_RETRY_AFTER = 60.0
_MAX_DETAIL = 300
MAX_ANSWER_BYTES = 16 * 1024 * 1024  # the default of FALHOOK_MAX_BODY_BYTES
_PARSE_IN_THREAD_BYTES = 256 * 1024  # as for a webhook's body (intake.py)


@dataclass(frozen=True, slots=True)
class QueueAnswer:
    """fal's answer to one call: the HTTP status, the JSON body (if not JSON: the start of
    its text, or None when empty)."""

    status_code: int
    body: Any
    error_type: str | None  # the X-Fal-Error-Type header, or the body's error_type
    retry_after: float | None  # seconds, from Retry-After
    # The answer's bytes when they are UTF-8 JSON (a result is stored from these, not
    # written out again from `body`); None otherwise.
    raw: bytes | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status_code < 300

    def detail(self) -> str:
        """fal's own words about an error answer, short."""
        body = self.body
        if isinstance(body, dict) and "detail" in body:
            body = body["detail"]
        text = body if isinstance(body, str) else json.dumps(body)
        # Kept in a text column (an expectation's reason): no NUL, no lone surrogate.
        return column_text(text[:_MAX_DETAIL])


def retry_after_seconds(value: str | None) -> float | None:
    """Retry-After as seconds: a number, or an HTTP date (RFC 9110), at most
    `MAX_RETRY_AFTER`; None if unusable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    if math.isnan(seconds):
        return None
    return min(MAX_RETRY_AFTER, max(0.0, seconds))  # inf included: at most the cap


def outcome_of(status_code: int) -> QueueFailure | None:
    """The failure an HTTP status stands for (None: a 2xx)."""
    if 200 <= status_code < 300:
        return None
    if status_code == 401:
        return QueueFailure.UNAUTHORIZED
    if status_code == 403:
        return QueueFailure.FORBIDDEN
    if status_code in (404, 410):
        return QueueFailure.NOT_FOUND
    if status_code == 429:
        return QueueFailure.RATE_LIMITED
    if status_code in (408, 409, 425):
        return QueueFailure.TRY_AGAIN
    if status_code >= 500:
        return QueueFailure.SERVER_ERROR
    return QueueFailure.REJECTED


def _answer(response: httpx.Response, content: bytes | None = None) -> QueueAnswer:
    """An answer read: `content` is the body when it was streamed (`QueueClient.get`)."""
    content = response.content if content is None else content
    stripped = content.removeprefix(b"\xef\xbb\xbf").strip()  # a BOM is not JSON's
    raw: bytes | None = stripped
    try:
        body: Any = json.loads(stripped.decode())
    except (ValueError, RecursionError):
        raw = None
        try:
            body = json.loads(content)  # UTF-16/32, which json detects
        except (ValueError, RecursionError):
            body = content[: _MAX_DETAIL * 4].decode(errors="replace")[:_MAX_DETAIL] or None
    error_type = response.headers.get("x-fal-error-type")
    if error_type is None and isinstance(body, dict) and isinstance(body.get("error_type"), str):
        error_type = body["error_type"]
    return QueueAnswer(
        response.status_code,
        body,
        error_type,
        retry_after_seconds(response.headers.get("retry-after")),
        raw,
    )


class QueueClient:
    """fal's queue at `queue_url`, called with ``Authorization: Key <key>``."""

    def __init__(
        self,
        queue_url: str,
        key: str,
        *,
        observe: Callable[[str], None] | None = None,
        timeout: httpx.Timeout = TIMEOUT,
        deadline: float = CALL_DEADLINE,
        max_answer_bytes: int = MAX_ANSWER_BYTES,
    ) -> None:
        self.queue_url = queue_url.rstrip("/")
        self._headers = {"Authorization": f"Key {key}", "Accept": "application/json"}
        self._observe = observe or (lambda outcome: None)
        self._timeout = timeout
        self._deadline = deadline
        self.max_answer_bytes = max_answer_bytes
        self._client: httpx.AsyncClient | None = None
        # Set by the receiver with tracing on: each call is a CLIENT span.
        self.tracing: Tracing | None = None

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _async_client(self) -> httpx.AsyncClient:
        if self._client is None:
            # trust_env=False: no proxy from the environment sees the key by surprise.
            self._client = httpx.AsyncClient(
                timeout=self._timeout, follow_redirects=False, trust_env=False
            )
        return self._client

    def count(self, failure: QueueFailure | None) -> None:
        """Count one answer by what it meant (None: usable). `get` leaves this to its
        caller: a model's error fetched as a result is a usable answer, not a rejection,
        and a 200 that says nothing usable is a bad answer, not ok."""
        self._observe("ok" if failure is None else failure.value)

    def _check_target(self, url: str) -> None:
        if not same_origin(url, self.queue_url):
            raise QueueError(
                QueueFailure.REJECTED,
                f"{url} is not on fal's queue ({self.queue_url}); the fal key is sent only there",
            )

    async def get(self, url: str) -> QueueAnswer:
        """GET a status or result URL. Raises QueueError (counted) if no answer came
        (unreachable) or it is over `max_answer_bytes` (result_too_large); an answer is
        counted by the caller, once read (`count`)."""
        self._check_target(url)
        limit = self.max_answer_bytes

        async def call(http: httpx.AsyncClient) -> tuple[httpx.Response, bytes]:
            async with http.stream("GET", url, headers=self._headers) as response:
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise self._too_large(int(declared))
                content = bytearray()
                async for chunk in response.aiter_bytes():  # decoded: the limit is on JSON
                    content += chunk
                    if len(content) > limit:
                        raise self._too_large(None)
                return response, bytes(content)

        if self.tracing is None:
            return await self._read(call)
        with self.tracing.calling("GET", url) as span:
            answer = await self._read(call)
            span.answered(answer.status_code)
            return answer

    async def _read(
        self, call: Callable[[httpx.AsyncClient], Awaitable[tuple[httpx.Response, bytes]]]
    ) -> QueueAnswer:
        response, content = await self._send(call)
        if len(content) > _PARSE_IN_THREAD_BYTES:
            # Megabytes of JSON would stall the loop (a thread still holds the GIL while
            # it parses, but no longer than the parse itself).
            return await asyncio.to_thread(_answer, response, content)
        return _answer(response, content)

    def _too_large(self, declared: int | None) -> QueueError:
        self.count(QueueFailure.RESULT_TOO_LARGE)
        size = f"{declared} bytes, more" if declared is not None else "more"
        return QueueError(
            QueueFailure.RESULT_TOO_LARGE,
            f"fal's queue answered {size} than the {self.max_answer_bytes} bytes a delivery "
            "may have (FALHOOK_MAX_BODY_BYTES)",
        )

    async def _send(self, call: Callable[[httpx.AsyncClient], Awaitable[R]]) -> R:
        """One call within its deadline; QueueError(unreachable), counted, if no answer."""
        try:
            async with asyncio.timeout(self._deadline):
                return await call(self._async_client())
        except TimeoutError as exc:
            raise self._unreachable(f"did not answer within {self._deadline:g} s") from exc
        except httpx.HTTPError as exc:
            raise self._unreachable(f"is unreachable: {_brief(exc)}") from exc

    def _unreachable(self, what: str) -> QueueError:
        self.count(QueueFailure.UNREACHABLE)
        return QueueError(QueueFailure.UNREACHABLE, f"fal's queue {what}")

    async def submit(
        self,
        endpoint_id: str,
        arguments: Any,
        *,
        webhook_url: str | None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """POST a request to the queue; fal's answer (it has ``request_id``, ``status_url``,
        ``response_url``…). Raises QueueError for anything else."""
        url, params, sent = self._submission(endpoint_id, webhook_url, headers)
        with (
            contextlib.nullcontext()
            if self.tracing is None
            else self.tracing.calling("POST", url) as call
        ):
            response = await self._send(
                lambda http: http.post(url, params=params, json=arguments, headers=sent)
            )
            if call is not None:
                call.answered(response.status_code)
        return self._submitted(_answer(response))

    def submit_sync(
        self,
        endpoint_id: str,
        arguments: Any,
        *,
        webhook_url: str | None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """`submit` for code without an event loop (the CLI, a sync web framework)."""
        url, params, sent = self._submission(endpoint_id, webhook_url, headers)
        try:
            with (
                contextlib.nullcontext()
                if self.tracing is None
                else self.tracing.calling("POST", url) as call,
                httpx.Client(
                    timeout=self._timeout, follow_redirects=False, trust_env=False
                ) as client,
            ):
                response = client.post(url, params=params, json=arguments, headers=sent)
                if call is not None:
                    call.answered(response.status_code)
        except httpx.HTTPError as exc:
            raise self._unreachable(f"is unreachable: {_brief(exc)}") from exc
        return self._submitted(_answer(response))

    def _submission(
        self, endpoint_id: str, webhook_url: str | None, headers: Mapping[str, str] | None
    ) -> tuple[str, dict[str, str], dict[str, str]]:
        try:
            url = submit_url(self.queue_url, endpoint_id)
        except ValueError as exc:
            raise QueueError(QueueFailure.REJECTED, str(exc)) from None
        params = {"fal_webhook": webhook_url} if webhook_url else {}
        return url, params, {**(headers or {}), **self._headers}

    def _submitted(self, answer: QueueAnswer) -> dict[str, Any]:
        failure = outcome_of(answer.status_code)
        if failure is not None:
            self.count(failure)
            raise QueueError(
                failure,
                f"fal's queue answered {answer.status_code}: {answer.detail()}",
                status_code=answer.status_code,
                retry_after=answer.retry_after,
                body=answer.body,
            )
        body = answer.body
        if not isinstance(body, dict) or not isinstance(body.get("request_id"), str):
            self.count(QueueFailure.BAD_ANSWER)
            raise QueueError(
                QueueFailure.BAD_ANSWER,
                f"fal's queue answered {answer.status_code} without a request_id",
                status_code=answer.status_code,
                body=body,
            )
        self.count(None)
        # request_id first: what the caller needs, and what `falhook submit` prints.
        return {"request_id": body["request_id"], **body}


def _brief(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
