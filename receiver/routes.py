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
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from falhook.receiver.errors import StoreUnavailableError
from falhook.receiver.logs import delivery_log
from falhook.receiver.metrics import CONTENT_TYPE
from falhook.receiver.store import NewDelivery
from falhook.verify import KeysUnavailableError, WebhookHeaders, WebhookVerificationError

if TYPE_CHECKING:
    from falhook.receiver.app import WebhookReceiver

__all__ = ["WebhookEndpoint", "healthz", "metrics", "not_found", "readyz"]

log = logging.getLogger("falhook.receiver")
_JSON = (b"content-type", b"application/json")
_ARRIVED = "falhook.arrived"  # set by falhook.receiver.protocol (not imported: uvicorn)
_PARSE_IN_THREAD_BYTES = 256 * 1024  # parsing megabytes of JSON would stall the loop


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
    """``POST /webhooks/fal`` (and with a trailing slash): the one path a delivery takes."""

    def __init__(self, receiver: WebhookReceiver) -> None:
        self.receiver = receiver
        settings = receiver.settings
        self.max_body = settings.max_body_bytes
        self.max_buffered = settings.max_buffered_bytes
        self.body_timeout = settings.body_timeout_seconds
        self.log_payloads = settings.log_payloads
        self.lease_seconds = settings.lease_seconds
        # Body bytes held by requests in flight, across all of them (one event loop: a
        # plain int is enough).
        self.buffered = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        held = [0]  # this request's share of `buffered`
        try:
            await self._handle(scope, receive, send, held)
        finally:
            self.buffered -= held[0]  # given back once answered, whatever happened

    async def _handle(self, scope: Scope, receive: Receive, send: Send, held: list[int]) -> None:
        # From the request's first byte when `falhook serve` runs us (see protocol.py).
        started = scope.get(_ARRIVED) or time.perf_counter()
        request_id = None
        body_read = False
        try:
            if scope["method"] != "POST":
                raise _Reject(405, "method_not_allowed", "use POST")
            declared = self._declared_length(scope)
            checked = self._check_headers(scope)
            body = await self._read_body(receive, declared, held)
            if body is None:
                return  # the client went away; there is nobody to answer
            body_read = True
            request_id, duplicate = await self._accept(body, checked)
        except _Reject as rejection:
            self._rejected(rejection, request_id, scope)
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
            self.receiver.metrics.rejected("internal_error")
            await _send_json(send, 503, _error_body("internal_error", "please retry"))
            return
        metrics = self.receiver.metrics
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

    def _check_headers(self, scope: Scope) -> WebhookHeaders:
        receiver = self.receiver
        if not receiver.started:
            log.error(
                "a delivery arrived but the receiver was never started: run its lifespan "
                "(lifespan=hooks.lifespan, or `async with hooks:` in the host's lifespan)"
            )
            raise _Reject(503, "receiver_not_started", "the receiver's lifespan has not run")
        try:
            return receiver.keys.check_headers(scope["headers"])
        except WebhookVerificationError as exc:
            raise _Reject(401, exc.reason.value, str(exc)) from None

    def _declared_length(self, scope: Scope) -> int:
        """Content-Length, or -1 when none was sent (chunked); 413 when over the cap."""
        declared = -1
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
        return declared

    async def _read_body(self, receive: Receive, declared: int, held: list[int]) -> bytes | None:
        if declared >= 0:
            self._hold(held, declared)  # all of it up front: refuse before reading any
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.body_timeout):
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
                        if size > held[0]:  # chunked: no length was declared
                            self._hold(held, size - held[0])
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

    def _too_large(self) -> _Reject:
        return _Reject(413, "body_too_large", f"body exceeds {self.max_body} bytes")

    async def _accept(self, body: bytes, checked: WebhookHeaders) -> tuple[str, bool]:
        receiver = self.receiver
        try:
            verified = await receiver.keys.verify(body, checked)
        except WebhookVerificationError as exc:
            raise _Reject(401, exc.reason.value, str(exc)) from None
        except KeysUnavailableError as exc:
            raise _Reject(503, "keys_unavailable", str(exc)) from None
        data = await self._parse(body)
        request_id = data.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise _Reject(400, "missing_request_id", "body has no request_id string")
        if request_id != verified.request_id:
            raise _Reject(
                400, "request_id_mismatch", "body request_id differs from the signed header"
            )
        status = data.get("status")
        if status not in ("OK", "ERROR"):
            raise _Reject(400, "invalid_status", 'status must be "OK" or "ERROR"')
        new = NewDelivery(
            request_id=request_id,
            gateway_request_id=_text(data.get("gateway_request_id")),
            status=status,
            error=_text(data.get("error")),
            payload_error=_text(data.get("payload_error")),
            user_id=verified.user_id,
            body=body,
            received_at=time.time(),
        )
        dispatcher = receiver.dispatcher
        claim_id = dispatcher.reserve() if dispatcher is not None else None
        try:
            is_new = await receiver.store.insert(
                new, claim_id=claim_id, lease_seconds=self.lease_seconds, parsed=data
            )
        except StoreUnavailableError as exc:
            log.warning("cannot store %s: %s", request_id, exc)
            raise _Reject(503, "store_unavailable", "the store cannot commit right now") from None
        finally:
            if claim_id is not None:
                dispatcher.release(claim_id)  # type: ignore[union-attr]  # no-op once adopted
        return request_id, not is_new

    @staticmethod
    async def _parse(body: bytes) -> dict[str, Any]:
        try:
            if len(body) > _PARSE_IN_THREAD_BYTES:
                data = await asyncio.to_thread(_loads, body)
            else:
                data = _loads(body)
        except (ValueError, RecursionError):
            raise _Reject(400, "invalid_json", "body is not valid UTF-8 JSON") from None
        if not isinstance(data, dict):
            raise _Reject(400, "invalid_json", "body is not a JSON object")
        return data

    def _rejected(self, rejection: _Reject, request_id: str | None, scope: Scope) -> None:
        self.receiver.metrics.rejected(rejection.error)
        delivery_log.info(
            "delivery rejected: %s",
            rejection.error,
            extra={
                "outcome": "rejected",
                "status": rejection.status,
                "reason": rejection.error,
                "request_id": request_id or _header(scope, b"x-fal-webhook-request-id"),
            },
        )


def _loads(body: bytes) -> Any:
    # Decoded first: json.loads(bytes) would also sniff for UTF-16/32, which fal never
    # sends, at ~1 us a delivery. Both steps run where the caller put the parse (a
    # thread for big bodies): decoding megabytes is no cheaper than parsing them.
    return json.loads(body.decode())


def _text(value: Any) -> str | None:
    """A column's text for a field fal documents as a string (kept verbatim in the body)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)


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
    receiver: WebhookReceiver = request.app.state.falhook
    if not receiver.started:
        return JSONResponse({"error": "receiver_not_started"}, status_code=503)
    try:
        await receiver.store.ping()
    except StoreUnavailableError as exc:
        return JSONResponse({"error": "store_unavailable", "detail": str(exc)}, status_code=503)
    try:
        await receiver.keys.ready()
    except KeysUnavailableError as exc:
        return JSONResponse({"error": "keys_unavailable", "detail": str(exc)}, status_code=503)
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    receiver: WebhookReceiver = request.app.state.falhook
    body = await asyncio.to_thread(receiver.metrics.render)
    return Response(body, media_type=CONTENT_TYPE)


async def not_found(scope: Scope, receive: Receive, send: Send) -> None:
    """Unknown paths: a JSON 404 (never a redirect)."""
    await _send_json(send, 404, _error_body("not_found", "no such route"))
