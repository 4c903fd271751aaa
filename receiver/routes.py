"""HTTP endpoints. The webhook route is a raw ASGI app: it streams the body under a cap,
verifies, parses, stores, and only then answers — with a JSON body in every case.

Statuses: 200 new or duplicate; 400 verified but malformed; 401 not authentic; 405 wrong
method; 408 body not received in time; 413 body over the cap; 503 keys or store unavailable,
or too many body bytes buffered at once (fal retries); never 3xx.

What the headers alone decide (present, well-formed, timestamp, user pin) is decided
before a byte of the body is read, so an unauthenticated client cannot make us buffer it.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from falhook.receiver.deadlines import Deadlines
from falhook.receiver.errors import (
    MalformedDeliveryError,
    NotStartedError,
    ReceiverError,
    StoreUnavailableError,
)
from falhook.receiver.intake import Accepted, Intake
from falhook.receiver.memtrim import MemoryTrimmer
from falhook.receiver.metrics import CONTENT_TYPE, Metrics
from falhook.receiver.settings import WEBHOOK_PATH
from falhook.verify import KeysUnavailableError, WebhookHeaders, WebhookVerificationError

if TYPE_CHECKING:
    from falhook.receiver.tracing.spans import Receiving as Traced
    from falhook.receiver.tracing.spans import Tracing

__all__ = ["NotFound", "Receiving", "WebhookEndpoint", "healthz", "metrics", "readyz"]

log = logging.getLogger("falhook.receiver")
delivery_log = logging.getLogger("falhook.deliveries")  # one line per delivery outcome
_JSON = (b"content-type", b"application/json")
_ARRIVED = "falhook.arrived"  # set by falhook.receiver.protocol (not imported: uvicorn)


class Receiving(Protocol):
    """What the routes need of the receiver (``app.state.falhook``)."""

    metrics: Metrics

    @property
    def dispatch_paused(self) -> bool | None: ...

    async def ready(self) -> None: ...


class _Reject(Exception):  # noqa: N818 — internal control flow, never escapes this module
    def __init__(self, status: int, error: str, detail: str) -> None:
        self.status, self.error, self.detail = status, error, detail


async def _send_json(send: Send, status: int, body: bytes, *extra: tuple[bytes, bytes]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [_JSON, (b"content-length", str(len(body)).encode()), *extra],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _error_body(error: str, detail: str) -> bytes:
    return json.dumps({"error": error, "detail": detail}).encode()


class WebhookEndpoint:
    """``POST /webhooks/fal`` (and with a trailing slash): HTTP around the started
    receiver's `Intake`: its key source's `check_headers` (before the body is read), then
    `Intake.accept`. Without an intake (not started, or stopping) a delivery gets 503
    ``receiver_not_started``."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        intake: Intake | None = None,
        max_body: int,
        max_buffered: int,
        body_timeout: float,
        log_payloads: bool,
        deadlines: Deadlines | None = None,
        trimmer: MemoryTrimmer | None = None,
    ) -> None:
        self.intake = intake  # set while the receiver is started
        self.metrics = metrics
        self.max_body = max_body
        self.max_buffered = max_buffered
        self.body_timeout = body_timeout
        self.deadlines = deadlines or Deadlines()
        self.log_payloads = log_payloads
        # Told how many bytes are buffered, to give memory back after large bodies.
        self.trimmer = trimmer if trimmer is not None and trimmer.enabled else None
        # Body bytes held by requests in flight, across all of them (one event loop: a
        # plain int is enough).
        self.buffered = 0
        # Set when the receiver starts with tracing on (receiver/tracing/).
        self.tracing: Tracing | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        held = [0]  # this request's share of `buffered`
        tracing = self.tracing
        traced = None
        try:
            if tracing is None:
                await self._handle(scope, receive, send, held, None)
            else:
                traced = tracing.receiving(scope, scope.get(_ARRIVED) or time.perf_counter())
                await self._handle(scope, receive, send, held, traced)
        finally:
            if traced is not None:
                traced.end()
            if held[0]:  # given back once answered, whatever happened
                self.buffered -= held[0]
                if self.trimmer is not None:
                    self.trimmer.released(self.buffered)

    async def _handle(
        self, scope: Scope, receive: Receive, send: Send, held: list[int], traced: Traced | None
    ) -> None:
        # From the request's arrival in the kernel when `falhook serve` runs us (see
        # protocol.py), else from now.
        started = scope.get(_ARRIVED) or time.perf_counter()
        request_id = None
        body_read = False
        try:
            if scope["method"] != "POST":
                raise _Reject(405, "method_not_allowed", "use POST")
            self._check_declared_length(scope)
            intake = self.intake
            if intake is None:
                raise _not_started()
            checked = self._check_headers(intake, scope)
            body = await self._read_body(receive, held)
            if body is None:
                return  # the client went away; there is nobody to answer
            body_read = True
            request_id, duplicate = await self._accept(intake, body, checked)
        except _Reject as rejection:
            self._rejected(rejection, request_id, scope)
            if traced is not None:
                traced.answered(
                    rejection.status,
                    request_id=request_id or _header(scope, b"x-fal-webhook-request-id"),
                    reason=rejection.error,
                )
            extra = [(b"allow", b"POST")] if rejection.status == 405 else []
            if not body_read:
                # The rest of the body is still on the wire: close the connection after
                # answering, or the server would keep reading (and discarding) all of it.
                extra.append((b"connection", b"close"))
            await _send_json(
                send, rejection.status, _error_body(rejection.error, rejection.detail), *extra
            )
            return
        except Exception:
            # A bug of ours must not become a 500 that fal may treat as final, nor a lost
            # delivery: answer 503 so fal retries, and log it loudly.
            log.exception("unexpected error handling a delivery")
            self.metrics.rejected("internal_error")
            if traced is not None:
                traced.answered(503, reason="internal_error")
            await _send_json(send, 503, _error_body("internal_error", "please retry"))
            return
        metrics = self.metrics
        if traced is not None:
            traced.answered(200, request_id=request_id, duplicate=duplicate)
        (metrics.duplicate if duplicate else metrics.accepted).inc()
        metrics.ack_latency.observe(time.perf_counter() - started)
        if delivery_log.isEnabledFor(logging.INFO):
            fields = {"request_id": request_id, "outcome": "duplicate" if duplicate else "accepted"}
            if self.log_payloads:  # off by default: payloads may hold users' data
                fields["body"] = body.decode("utf-8", "replace")
            delivery_log.info("delivery %s", fields["outcome"], extra=fields)
        await _send_json(
            send,
            200,
            b'{"request_id":%s,"duplicate":%s}'
            % (json.dumps(request_id).encode(), b"true" if duplicate else b"false"),
        )

    def _check_headers(self, intake: Intake, scope: Scope) -> WebhookHeaders:
        try:
            return intake.keys.check_headers(scope["headers"])
        except WebhookVerificationError as exc:
            raise _Reject(401, exc.reason.value, str(exc)) from None

    def _check_declared_length(self, scope: Scope) -> None:
        """413 when Content-Length is over the cap (before reading a byte of the body)."""
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    raise _Reject(
                        400, "invalid_content_length", "Content-Length is not a number"
                    ) from None
                if declared > self.max_body:
                    raise self._too_large()
                break

    async def _read_body(self, receive: Receive, held: list[int]) -> bytes | None:
        # Bytes are held against the budget as they arrive, not as declared: headers alone
        # (a forged signature is only found out once the body is in) declaring 16 MiB and
        # sending nothing would otherwise hold the whole budget, and deny every delivery.
        chunks: list[bytes] = []
        size = 0
        try:
            async with self.deadlines.scope(self.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    if chunk:
                        size += len(chunk)
                        if size > self.max_body:
                            # Answer now, without reading (or buffering) the rest of the body.
                            raise self._too_large()
                        self._hold(held, len(chunk))
                        chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
        except TimeoutError:
            raise _Reject(
                408, "body_timeout", f"body not received within {self.body_timeout:g} s"
            ) from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _hold(self, held: list[int], size: int) -> None:
        if self.buffered + size > self.max_buffered:
            raise _Reject(
                503, "body_budget_exceeded", "too many body bytes in flight; please retry"
            )
        self.buffered += size
        held[0] += size
        if self.trimmer is not None:
            self.trimmer.buffered(self.buffered)

    def _too_large(self) -> _Reject:
        return _Reject(413, "body_too_large", f"body exceeds {self.max_body} bytes")

    async def _accept(self, intake: Intake, body: bytes, checked: WebhookHeaders) -> Accepted:
        """`Intake.accept`, with each way it can fail mapped to its HTTP answer."""
        try:
            return await intake.accept(body, checked)
        except WebhookVerificationError as exc:
            raise _Reject(401, exc.reason.value, str(exc)) from None
        except KeysUnavailableError as exc:
            raise _Reject(503, exc.reason.value, str(exc)) from None
        except MalformedDeliveryError as exc:
            raise _Reject(400, exc.reason.value, str(exc)) from None
        except StoreUnavailableError as exc:
            log.warning("cannot store %s: %s", checked.request_id, exc)
            raise _Reject(503, exc.reason.value, "the store cannot commit right now") from None

    def _rejected(self, rejection: _Reject, request_id: str | None, scope: Scope) -> None:
        self.metrics.rejected(rejection.error)
        delivery_log.info(
            "delivery rejected: %s",
            rejection.error,
            extra={
                "outcome": "rejected",
                "status": rejection.status,
                "reason": rejection.error,
                "detail": rejection.detail,  # e.g. which header was missing
                "client": _client(scope),
                "request_id": request_id or _header(scope, b"x-fal-webhook-request-id"),
            },
        )


def _not_started() -> _Reject:
    log.error(
        "a delivery arrived but the receiver was never started: run its lifespan "
        "(lifespan=hooks.lifespan, or `async with hooks:` in the host's lifespan)"
    )
    return _Reject(503, NotStartedError.reason.value, "the receiver's lifespan has not run")


def _client(scope: Scope) -> str | None:
    """The client's address. Under `falhook serve`, uvicorn has already replaced a trusted
    proxy's address (--forwarded-allow-ips) with the one in its X-Forwarded-For."""
    client = scope.get("client")
    return str(client[0]) if client else None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            text: str = value.decode("latin-1")
            return text[:256]
    return None


async def healthz(request: Request) -> Response:
    """The process is up (nothing else is checked)."""
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """Ready when started, the store answers and keys can be had."""
    receiver: Receiving = request.app.state.falhook
    try:
        await receiver.ready()
    except (ReceiverError, KeysUnavailableError) as exc:
        return JSONResponse({"error": exc.reason.value, "detail": str(exc)}, status_code=503)
    # Paused dispatch is still ready: deliveries are received, stored and acknowledged.
    paused = receiver.dispatch_paused
    dispatch = "unknown" if paused is None else "paused" if paused else "running"
    return JSONResponse({"status": "ready", "dispatch": dispatch})


async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    receiver: Receiving = request.app.state.falhook
    body = await asyncio.to_thread(receiver.metrics.render)
    return Response(body, media_type=CONTENT_TYPE)


class NotFound:
    """Unknown paths: a JSON 404 (never a redirect), counted, and logged at most once a
    minute per path, with a hint when the path looks like a mistyped webhook path.

    A mistyped webhook URL given to fal loses every result sent to it, and fal's retries
    only repeat the 404: the count (``falhook_unknown_path_requests_total``) and the line
    are how an operator finds out. The paths remembered for the once-a-minute rule are
    bounded (`tracked`): when every one of them was logged within the minute (a scanner),
    a new path is counted but not logged.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        window: float = 60.0,
        tracked: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._near = metrics.unknown_paths.labels("webhook_path")
        self._other = metrics.unknown_paths.labels("other")
        self._window = window
        self._tracked = tracked
        self._clock = clock
        self._logged: OrderedDict[str, float] = OrderedDict()  # path -> when last logged

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            self._note(scope)
        await _send_json(send, 404, _error_body("not_found", "no such route"))

    def _note(self, scope: Scope) -> None:
        path: str = scope["path"][:256]
        webhook = scope.get("root_path", "") + WEBHOOK_PATH
        near = _near(path, webhook)
        (self._near if near else self._other).inc()
        if not self._should_log(path):
            return
        fields: dict[str, Any] = {
            "method": scope["method"],
            "path": path,
            "status": 404,
            "client": _client(scope),
        }
        if near:
            fields["hint"] = f"the webhook path is {webhook}: is fal given a mistyped URL?"
        log.log(
            logging.WARNING if near else logging.INFO,
            "request to an unknown path: %s %s",
            scope["method"],
            path,
            extra=fields,
        )

    def _should_log(self, path: str) -> bool:
        now = self._clock()
        logged = self._logged
        last = logged.get(path)
        if last is not None:
            if now - last < self._window:
                return False
            logged.move_to_end(path)
        elif len(logged) >= self._tracked:
            if now - next(iter(logged.values())) < self._window:
                return False  # every remembered path was logged within the minute
            logged.popitem(last=False)
        logged[path] = now
        return True


def _near(path: str, webhook: str) -> bool:
    """A path that looks like the webhook path mistyped: /webhook/fal, /webhooks,
    /webhooks/fal/x, /api/webhooks/fal, /webhooks/fla…"""
    lowered = path.lower()
    return (
        "webhook" in lowered
        or difflib.SequenceMatcher(None, lowered, webhook.lower()).ratio() >= 0.75
    )
