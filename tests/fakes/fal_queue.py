"""A loopback fake of fal.ai's queue API (``https://queue.fal.run``), for end-to-end tests.

`FakeFalQueue` runs a real uvicorn server on ``127.0.0.1`` in a background thread. The test
drives each request through the queue lifecycle, injects failures, and has the fake send the
webhook for a completed request. It depends only on starlette, uvicorn, httpx, pynacl and the
standard library (never on ``falhook``), so it is an independent oracle for the receiver.

Sources (cited in the docstrings below):

- "W§n" is a section of ``/work/shared/FAL_WEBHOOKS.md``, which collects fal's docs (its
  S-numbers: S1 webhooks page, S5 queue page, S6 request error types, S9 Inference API
  reference) and fal-js (S10).
- "Q" is ``/work/shared/fal-queue-docs.txt`` (fal's "Asynchronous inference / queue" page, S5).

Routes (paths relative to `FakeFalQueue.url`, which stands for ``https://queue.fal.run``):

==========================================  ======  =========================================
``/{endpoint_id}[?fal_webhook=URL]``        POST    submit → 200 (W§4, Q "Submit")
``/{owner}/{app}/requests/{id}/status``     GET     202 IN_QUEUE/IN_PROGRESS, 200 COMPLETED
                                                    (W§4 quoting S9; ``?logs=1``: Q)
``/{owner}/{app}/requests/{id}``            GET     the stored result (W§4, S9 "Get request
                                                    result")
``/{owner}/{app}/requests/{id}/cancel``     PUT     202 / 400 / 404 (W§4, Q "Cancel")
``/{owner}/{app}/requests/{id}/status/stream`` GET  not implemented: 501
==========================================  ======  =========================================

``{owner}/{app}`` is computed like fal-js ``parseEndpointId`` (W§4, S10): the endpoint path
(``/dev`` in ``fal-ai/flux/dev``) is used to submit, never for status, result or cancel; a
``workflows/`` or ``comfy/`` namespace stays in front.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, TypeVar

import httpx
import uvicorn
from nacl.signing import SigningKey
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.polling import wait_for

__all__ = [
    "DEFAULT_OUTPUT",
    "ERROR_TYPE_STATUS",
    "PAYLOAD_NOT_SERIALIZABLE",
    "ROUTES",
    "EndpointId",
    "FakeFalQueue",
    "FakeRequest",
    "QueueState",
    "RecordedRequest",
    "RouteName",
    "Signer",
    "WebhookDelivery",
    "ed25519_signer",
    "parse_endpoint_id",
    "wait_until",
]

QueueState = Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
"""The only queue states (W§4 "Lifecycle", Q "Request Lifecycle"): no FAILED, no CANCELED."""

RouteName = Literal["submit", "status", "status_stream", "result", "cancel", "other"]
ROUTES: tuple[RouteName, ...] = ("submit", "status", "status_stream", "result", "cancel", "other")

Signer = Callable[[bytes], Mapping[str, str]]
"""``sign(body) -> headers``: the ``X-Fal-Webhook-*`` headers for a webhook body (W§3)."""

T = TypeVar("T")

ERROR_TYPE_STATUS: Mapping[str, int] = {
    "request_timeout": 504,
    "startup_timeout": 504,
    "runner_scheduling_failure": 503,
    "runner_connection_timeout": 503,
    "runner_disconnected": 503,
    "runner_connection_refused": 503,
    "runner_connection_error": 503,
    "runner_incomplete_response": 502,
    "runner_server_error": 500,
    "client_disconnected": 499,
    "client_cancelled": 499,
    "bad_request": 400,
    "internal_error": 500,
}
"""fal's Request Error Types and their typical HTTP status (W§4 table, S6)."""

PAYLOAD_NOT_SERIALIZABLE = (
    "Response payload is not JSON serializable. Either return a JSON serializable object or "
    "use the queue endpoint to retrieve the response."
)
"""The ``payload_error`` text of a webhook whose payload fal could not send (W§1, S1/S2)."""

DEFAULT_OUTPUT: dict[str, Any] = {
    "images": [
        {
            "url": "https://v3.fal.media/files/fake/image.png",
            "content_type": "image/png",
            "file_name": "image.png",
            "file_size": 1824075,
            "width": 1024,
            "height": 1024,
        }
    ],
    "seed": 17454220438242315174,  # > 2**53, like the captured delivery (W§1 [OBS])
    "has_nsfw_concepts": [False],
    "prompt": "dog",
}
"""A model output shaped like the docs example and the captured delivery (W§1)."""

HEALTH_PATH = "/__fake_fal__/health"
"""Not a fal route: the readiness probe of `FakeFalQueue.start` (never logged, never failed)."""

_ENDPOINT_NAMESPACES = ("workflows", "comfy")
_LEGACY_APP_ID = re.compile(r"^([0-9]+)-([a-zA-Z0-9-]+)$")
_QUEUE_OP = re.compile(
    r"^/(?P<prefix>.+)/requests/(?P<rid>[^/]+)(?P<op>/status/stream|/status|/cancel)?/?$"
)
_DEFAULT_FAILURE_DETAIL: Mapping[int, str] = {
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def wait_until(
    check: Callable[[], T], *, timeout: float = 5.0, interval: float = 0.005, what: str = ""
) -> T:
    """`tests.polling.wait_for` with the fake's shorter defaults."""
    return wait_for(check, timeout=timeout, interval=interval, what=what)


# --------------------------------------------------------------------------- endpoint ids


@dataclass(frozen=True)
class EndpointId:
    """An endpoint id split like fal-js ``parseEndpointId`` (W§4, S10 ``utils.ts``)."""

    owner: str
    alias: str
    path: str | None = None
    namespace: str | None = None

    @property
    def app_prefix(self) -> str:
        """``[namespace/]owner/alias``: the part of the status/result/cancel URLs (W§4)."""
        prefix = f"{self.namespace}/" if self.namespace else ""
        return f"{prefix}{self.owner}/{self.alias}"


def parse_endpoint_id(endpoint_id: str) -> EndpointId:
    """Split ``fal-ai/flux/dev`` into owner ``fal-ai``, alias ``flux``, path ``dev``.

    Mirrors fal-js: a legacy ``123-app`` id becomes ``123/app``; ``workflows/`` and ``comfy/``
    are namespaces in front of owner/alias. Raises `ValueError` for a one-part id.
    """
    endpoint_id = endpoint_id.strip("/")
    parts = endpoint_id.split("/")
    if len(parts) == 1:
        legacy = _LEGACY_APP_ID.match(endpoint_id)
        if legacy is None:
            raise ValueError(f"invalid app id {endpoint_id!r}: must be <owner>/<app>[/<path>]")
        parts = [legacy.group(1), legacy.group(2)]
    if parts[0] in _ENDPOINT_NAMESPACES and len(parts) >= 3:
        return EndpointId(parts[1], parts[2], "/".join(parts[3:]) or None, parts[0])
    if not parts[0] or not parts[1]:
        raise ValueError(f"invalid app id {endpoint_id!r}: empty owner or app")
    return EndpointId(parts[0], parts[1], "/".join(parts[2:]) or None)


# ------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request the fake received (the readiness probe excluded)."""

    method: str
    path: str
    query: str
    """The raw query string (``logs=1``); see `params` for the parsed form."""
    params: Mapping[str, str]
    headers: Mapping[str, str]
    """Lower-case header names."""
    body: bytes
    route: RouteName
    request_id: str | None
    """The queue request it concerns (for submit: the id it created), if any."""
    status_code: int
    """What the fake answered."""
    at: float
    """Wall-clock time (``time.time()``) of arrival."""
    monotonic: float
    """``time.monotonic()`` of arrival."""

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class WebhookDelivery:
    """One webhook POST the fake made (W§1)."""

    request_id: str
    url: str
    body: bytes
    headers: Mapping[str, str]
    status_code: int | None
    """The receiver's answer; ``None`` if the POST failed (see `error`)."""
    error: str | None
    at: float

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class _Outcome:
    output: Any = None
    error: str | None = None
    error_type: str | None = None
    status_code: int = 200
    error_body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    inference_time: float = 0.5

    @property
    def failed(self) -> bool:
        return self.error is not None


@dataclass
class FakeRequest:
    """The fake's record of one queue request. `FakeFalQueue.get` returns a copy."""

    request_id: str
    gateway_request_id: str
    endpoint_id: str
    endpoint: EndpointId
    input: Any
    webhook_url: str | None
    query: dict[str, str]
    platform_headers: dict[str, str]
    """Every ``x-fal-*`` header sent with the submit (lower-case names), e.g.
    ``x-fal-queue-priority``, ``x-fal-runner-hint``, ``x-fal-request-timeout``,
    ``x-fal-no-retry``, ``x-fal-store-io``, ``x-fal-object-lifecycle-preference`` (W§4, Q)."""
    state: QueueState
    seq: int
    created_at: float
    auto_advance_after: int | None
    """This request's setting; ``None`` uses the fake's `FakeFalQueue.auto_advance_after`."""
    completed_at: float | None = None
    queue_position: int | None = None
    """A fixed position; ``None`` computes it (earlier IN_QUEUE requests of the same app)."""
    polls_in_state: int = 0
    logs: list[dict[str, Any]] = field(default_factory=list)
    planned: _Outcome | None = None
    outcome: _Outcome | None = None
    expired: tuple[int, Any] | None = None
    raw_result: tuple[int, str, bytes | Callable[[], Iterator[bytes]]] | None = None
    cancel_requested: bool = False
    webhook_withheld: bool = False

    @property
    def output(self) -> Any:
        return None if self.outcome is None else self.outcome.output

    @property
    def error(self) -> str | None:
        return None if self.outcome is None else self.outcome.error

    @property
    def error_type(self) -> str | None:
        return None if self.outcome is None else self.outcome.error_type

    @property
    def failed(self) -> bool:
        return self.outcome is not None and self.outcome.failed


@dataclass
class _Failure:
    status_code: int
    route: RouteName | None
    remaining: int | None
    body: Any
    headers: dict[str, str]


def ed25519_signer(seed: bytes, user_id: str, *, clock: Callable[[], float] = time.time) -> Signer:
    """A fal-style signer from a 32-byte Ed25519 seed, built on pynacl alone (W§3).

    Message: ``request_id \\n user_id \\n timestamp \\n hex(sha256(body))``; the signature is
    128 lowercase hex chars. ``request_id`` is read from the body.
    """
    signing_key = SigningKey(seed)

    def sign(body: bytes) -> dict[str, str]:
        request_id = str(json.loads(body)["request_id"])
        timestamp = str(int(clock()))
        digest = hashlib.sha256(body).hexdigest()
        message = f"{request_id}\n{user_id}\n{timestamp}\n{digest}".encode()
        return {
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": user_id,
            "X-Fal-Webhook-Timestamp": timestamp,
            "X-Fal-Webhook-Signature": signing_key.sign(message).signature.hex(),
        }

    return sign


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _classify(method: str, path: str) -> tuple[RouteName, str | None, str | None]:
    """(route, app prefix, request id) of a request, by method and path."""
    match = _QUEUE_OP.match(path)
    if match is not None:
        op = match.group("op")
        prefix, rid = match.group("prefix"), match.group("rid")
        if method == "GET" and op == "/status":
            return "status", prefix, rid
        if method == "GET" and op == "/status/stream":
            return "status_stream", prefix, rid
        if method == "PUT" and op == "/cancel":
            return "cancel", prefix, rid
        if method == "GET" and op is None:
            return "result", prefix, rid
        return "other", prefix, rid
    if method == "POST":
        return "submit", None, None
    return "other", None, None


class FakeFalQueue:
    """A loopback fake of ``queue.fal.run``: submit, status, result, cancel and webhooks.

    Use it as a context manager (or `start` / `stop`); `url` is the base URL that stands for
    ``https://queue.fal.run``. Every request must carry ``Authorization: Key <api_key>``
    (W§4 "Auth"); ``api_key=None`` turns auth off. A key in ``forbidden_keys`` is answered 403.

    The test moves requests through IN_QUEUE → IN_PROGRESS → COMPLETED with `advance` and
    `complete`; or, with ``auto_advance_after=N``, each state is answered to N status polls
    and the request then moves on (COMPLETED with the outcome set by `plan`, else
    ``default_output``).

    With ``auto_webhook=True`` the fake POSTs the webhook (from a background thread) when a
    request with a ``fal_webhook`` URL completes, unless `withhold_webhook` was called;
    `send_webhook` sends one at any time (a late or repeated delivery). ``signer`` makes the
    signature headers.

    Everything the fake receives is logged (`requests`, `count`, `counts`, `status_polls`).
    Thread-safe: the server thread and the test thread share one lock.
    """

    def __init__(
        self,
        *,
        api_key: str | None = "fal-test-key",
        forbidden_keys: Iterable[str] = (),
        host: str = "127.0.0.1",
        port: int = 0,
        auto_advance_after: int | None = None,
        default_output: Any = DEFAULT_OUTPUT,
        signer: Signer | None = None,
        auto_webhook: bool = False,
        strict_paths: bool = True,
        incomplete_result_status: int = 400,
        webhook_timeout: float = 15.0,
        ready_timeout: float = 10.0,
    ) -> None:
        """
        ``strict_paths``: status/result/cancel under any prefix but the request's
        ``owner/app`` answer 404 (catches clients that keep the endpoint path, W§4).
        ``incomplete_result_status``: the answer to a result fetch before COMPLETED (no fal
        document states it; 400 ``{"detail": "Request is still in progress"}`` is what
        client code in the wild expects). ``webhook_timeout``: fal's 15 s first-attempt
        timeout (W§2).
        """
        self.api_key = api_key
        self.forbidden_keys = set(forbidden_keys)
        self.host = host
        self.auto_advance_after = auto_advance_after
        self.default_output = default_output
        self.signer = signer
        self.auto_webhook = auto_webhook
        self.strict_paths = strict_paths
        self.incomplete_result_status = incomplete_result_status
        self.webhook_timeout = webhook_timeout
        self.ready_timeout = ready_timeout

        self._port = port
        self._lock = threading.RLock()
        self._lifecycle = threading.Lock()
        self._requests: dict[str, FakeRequest] = {}
        self._seq = 0
        self._log: list[RecordedRequest] = []
        self._failures: list[_Failure] = []
        self._stalled: set[tuple[RouteName, str]] = set()
        self._holding = 0
        self._deliveries: list[WebhookDelivery] = []
        self._delivery_threads: list[threading.Thread] = []
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._app = Starlette(
            routes=[
                Route(
                    "/{rest:path}",
                    self._endpoint,
                    methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
                )
            ]
        )

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the fake has not been started yet")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash); stable across `down` / `up`."""
        return f"http://{self.host}:{self.port}"

    @property
    def is_up(self) -> bool:
        return self._server is not None

    def start(self) -> FakeFalQueue:
        """Start serving (on the previous port if there was one) and wait until it answers."""
        with self._lifecycle:
            if self._server is not None:
                raise RuntimeError("already running")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self._port))
                sock.listen(128)
            except OSError:
                sock.close()
                raise
            self._port = sock.getsockname()[1]
            config = uvicorn.Config(
                self._app,
                host=self.host,
                port=self._port,
                log_config=None,
                log_level="warning",
                access_log=False,
                lifespan="off",
                ws="none",
                http="h11",
                loop="asyncio",
                timeout_graceful_shutdown=2,
            )
            server = uvicorn.Server(config)
            thread = threading.Thread(
                target=server.run,
                kwargs={"sockets": [sock]},
                name=f"FakeFalQueue:{self._port}",
                daemon=True,
            )
            self._server, self._thread, self._socket = server, thread, sock
            thread.start()
            try:
                self._wait_ready(server, thread)
            except BaseException:
                self._shutdown()
                raise
        return self

    def _wait_ready(self, server: uvicorn.Server, thread: threading.Thread) -> None:
        def started() -> bool:
            if not thread.is_alive():
                raise RuntimeError("the fake's server thread died during startup")
            return bool(server.started)

        wait_until(started, timeout=self.ready_timeout, what="uvicorn startup")
        with httpx.Client(timeout=1.0, trust_env=False) as client:

            def answers() -> bool:
                try:
                    return client.get(self.url + HEALTH_PATH).status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(answers, timeout=self.ready_timeout, what="the fake to answer")

    def stop(self) -> None:
        """Stop serving and wait for background webhook deliveries. Idempotent."""
        self.unstall()  # a held call would keep the server from shutting down
        with self._lifecycle:
            self._shutdown()
        with self._lock:
            threads = list(self._delivery_threads)
            self._delivery_threads.clear()
        for thread in threads:
            thread.join(self.webhook_timeout + 5)

    def _shutdown(self) -> None:
        server, thread, sock = self._server, self._thread, self._socket
        self._server = self._thread = self._socket = None
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(10)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(10)
            if thread.is_alive():
                raise RuntimeError("the fake's server thread did not stop")
        if sock is not None:
            sock.close()

    def down(self) -> None:
        """Simulate an outage: stop listening, so connections are refused. `up` restarts."""
        with self._lifecycle:
            if self._server is None:
                raise RuntimeError("not running")
            self._shutdown()

    def up(self) -> None:
        """End an outage: serve again on the SAME port, with all state kept."""
        self.start()

    def __enter__(self) -> FakeFalQueue:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ URLs

    def request_urls(self, request_id: str) -> dict[str, str]:
        """``response_url``, ``status_url``, ``cancel_url`` of a request: owner/app only (W§4)."""
        with self._lock:
            req = self._get(request_id)
            base = f"{self.url}/{req.endpoint.app_prefix}/requests/{request_id}"
        return {
            "response_url": base,
            "status_url": f"{base}/status",
            "cancel_url": f"{base}/cancel",
        }

    # ------------------------------------------------------------------ requests

    def create(
        self,
        endpoint_id: str,
        *,
        input: Any = None,
        webhook_url: str | None = None,
        request_id: str | None = None,
        gateway_request_id: str | None = None,
        state: QueueState = "IN_QUEUE",
        platform_headers: Mapping[str, str] | None = None,
        queue_position: int | None = None,
        auto_advance_after: int | None = None,
        output: Any = None,
        error: str | None = None,
        error_type: str | None = None,
        status_code: int | None = None,
        error_body: Any = None,
    ) -> str:
        """Add a request as if it had been submitted elsewhere; returns its ``request_id``.

        ``state="COMPLETED"`` completes it at once with the given outcome (see `complete`);
        otherwise the outcome is planned for when it completes. ``auto_advance_after``
        overrides the fake's setting for this request.
        """
        endpoint = parse_endpoint_id(endpoint_id)
        rid = request_id or str(uuid.uuid4())
        with self._lock:
            if rid in self._requests:
                raise ValueError(f"request {rid} already exists")
            self._seq += 1
            req = FakeRequest(
                request_id=rid,
                gateway_request_id=gateway_request_id or rid,
                endpoint_id=endpoint_id.strip("/"),
                endpoint=endpoint,
                input=copy.deepcopy(input),
                webhook_url=webhook_url,
                query={},
                platform_headers={k.lower(): v for k, v in (platform_headers or {}).items()},
                state="IN_QUEUE",
                seq=self._seq,
                created_at=time.time(),
                auto_advance_after=auto_advance_after,
                queue_position=queue_position,
            )
            self._requests[rid] = req
            has_outcome = any(
                x is not None for x in (output, error, error_type, status_code, error_body)
            )
            if has_outcome:
                req.planned = self._outcome(
                    output, error, error_type, status_code, error_body, None, None
                )
            if state == "IN_PROGRESS":
                self._to_in_progress(req)
            elif state == "COMPLETED":
                self._to_in_progress(req)
                self._to_completed(req, req.planned)
        return rid

    def get(self, request_id: str) -> FakeRequest:
        """A copy of the fake's record of a request (`KeyError` if unknown)."""
        with self._lock:
            return copy.deepcopy(self._get(request_id))

    def request_ids(self) -> list[str]:
        """All request ids, oldest first."""
        with self._lock:
            return [r.request_id for r in sorted(self._requests.values(), key=lambda r: r.seq)]

    def state(self, request_id: str) -> QueueState:
        with self._lock:
            return self._get(request_id).state

    def plan(
        self,
        request_id: str,
        output: Any = None,
        *,
        error: str | None = None,
        error_type: str | None = None,
        status_code: int | None = None,
        error_body: Any = None,
        headers: Mapping[str, str] | None = None,
        inference_time: float | None = None,
    ) -> None:
        """Set the outcome a later `advance` or automatic completion will use."""
        with self._lock:
            req = self._get(request_id)
            req.planned = self._outcome(
                output, error, error_type, status_code, error_body, headers, inference_time
            )

    def advance(self, request_id: str) -> QueueState:
        """One step: IN_QUEUE → IN_PROGRESS → COMPLETED (with the planned outcome)."""
        with self._lock:
            req = self._get(request_id)
            if req.state == "IN_QUEUE":
                self._to_in_progress(req)
            elif req.state == "IN_PROGRESS":
                self._to_completed(req, req.planned)
            else:
                raise ValueError(f"request {request_id} is already COMPLETED")
            return req.state

    def complete(
        self,
        request_id: str,
        output: Any = None,
        *,
        error: str | None = None,
        error_type: str | None = None,
        status_code: int | None = None,
        error_body: Any = None,
        headers: Mapping[str, str] | None = None,
        inference_time: float | None = None,
    ) -> None:
        """Complete a request now (from IN_QUEUE or IN_PROGRESS).

        Success: ``output`` (``None``: the planned outcome, else ``default_output``) is the
        result body, answered 200. Failure (``error`` or ``error_type`` given): the status
        answers COMPLETED with ``error`` and ``error_type`` (W§4 "Lifecycle", Q "Check
        Status"), and the result route answers what the model returned (S9 "Get request
        result": "returns the same error"): ``status_code`` (default: the S6 code of
        ``error_type``, W§4 table, else 500), body ``error_body`` (default the flat
        ``{"detail": error, "error_type": error_type}`` of S6) and an ``X-Fal-Error-Type``
        header. For a model validation error pass ``status_code=422`` and
        ``error_body={"detail": [...]}`` (W§4). ``headers`` adds response headers, e.g.
        ``X-Fal-Request-Timeout-Type: user`` for an expired start deadline (W§4, Q).
        """
        with self._lock:
            req = self._get(request_id)
            if req.state == "COMPLETED":
                raise ValueError(f"request {request_id} is already COMPLETED")
            nothing_given = all(
                x is None for x in (output, error, error_type, status_code, error_body)
            )
            outcome = (
                req.planned
                if nothing_given
                else self._outcome(
                    output, error, error_type, status_code, error_body, headers, inference_time
                )
            )
            if req.state == "IN_QUEUE":
                self._to_in_progress(req)
            self._to_completed(req, outcome)

    def expire(self, request_id: str, *, status_code: int = 404, detail: Any = None) -> None:
        """The stored result "is no longer stored": result fetches answer ``status_code``.

        fal keeps a result 1 h after completion, 6 min if it is 10 KB or more (S9 "Get
        request result"; W§2 quoting S4). No fal document says what a fetch after that
        answers: the default is 404 ``{"detail": "Request not found"}``. The status route
        still answers COMPLETED.
        """
        with self._lock:
            req = self._get(request_id)
            if req.state != "COMPLETED":
                raise ValueError(f"request {request_id} is not COMPLETED")
            body = {"detail": "Request not found"} if detail is None else {"detail": detail}
            req.expired = (status_code, body)

    def answer_result_raw(
        self,
        request_id: str,
        body: bytes | Callable[[], Iterator[bytes]],
        *,
        status_code: int = 200,
        content_type: str = "application/json",
    ) -> None:
        """Result fetches answer exactly ``body`` (not fal's documented shape): a page from a
        proxy, truncated JSON, a bare JSON string… ``body`` may be a function returning an
        iterator of chunks, streamed (for results too big to build, or sent slowly). The
        status route still answers COMPLETED."""
        with self._lock:
            req = self._get(request_id)
            if req.state != "COMPLETED":
                raise ValueError(f"request {request_id} is not COMPLETED")
            req.raw_result = (status_code, content_type, body)

    def set_queue_position(self, request_id: str, position: int | None) -> None:
        """Fix the ``queue_position`` answered while IN_QUEUE (``None``: computed)."""
        with self._lock:
            self._get(request_id).queue_position = position

    def withhold_webhook(self, request_id: str, withhold: bool = True) -> None:
        """Do not send this request's webhook automatically (`send_webhook` still can)."""
        with self._lock:
            self._get(request_id).webhook_withheld = withhold

    # ------------------------------------------------------------------ failures

    def fail(
        self,
        status_code: int,
        *,
        route: RouteName | None = None,
        times: int | None = None,
        retry_after: str | int | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer ``status_code`` to the next ``times`` requests (``None``: until cleared).

        ``route`` limits it to one route (see `ROUTES`); ``None`` means every route. Checked
        before auth. The default body is ``{"detail": ...}``; a 429 carries ``Retry-After``
        (default ``"1"``). Failures are matched in the order they were added.
        """
        if times is not None and times < 1:
            raise ValueError("times must be at least 1 (or None: until cleared)")
        if route is not None and route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; one of {ROUTES}")
        extra = dict(headers or {})
        if retry_after is not None:
            extra["Retry-After"] = str(retry_after)
        elif status_code == 429:
            extra.setdefault("Retry-After", "1")
        if body is None:
            body = {"detail": _DEFAULT_FAILURE_DETAIL.get(status_code, "Injected failure")}
        with self._lock:
            self._failures.append(_Failure(status_code, route, times, body, extra))

    def clear_failures(self) -> None:
        with self._lock:
            self._failures.clear()

    def stall(self, request_id: str, route: RouteName = "status") -> None:
        """Hold every call on `route` for `request_id` unanswered (a queue that hangs), until
        `unstall` or `stop`. Recorded only once answered."""
        with self._lock:
            self._stalled.add((route, request_id))

    def unstall(self) -> None:
        with self._lock:
            self._stalled.clear()

    def stalled_calls(self) -> int:
        """Calls being held by `stall` right now."""
        with self._lock:
            return self._holding

    # ------------------------------------------------------------------ webhooks

    def webhook_body(self, request_id: str, *, payload_error: str | None = None) -> bytes:
        """The webhook body fal would send for a COMPLETED request (W§1).

        Keys: ``request_id``, ``gateway_request_id``, ``status`` (``"OK"``/``"ERROR"``),
        ``payload``, ``error``, ``payload_error``; sorted, with ``", "``/``": "`` separators
        like the captured delivery (W§1 [OBS]). ERROR: ``error`` is ``"Invalid status code:
        N"`` and ``payload`` the error body (W§1, S1). ``payload_error`` (e.g.
        `PAYLOAD_NOT_SERIALIZABLE`): status OK with ``payload: null`` (W§1).
        """
        with self._lock:
            req = self._get(request_id)
            outcome = req.outcome
            if req.state != "COMPLETED" or outcome is None:
                raise ValueError(f"request {request_id} is not COMPLETED")
            body: dict[str, Any] = {
                "request_id": req.request_id,
                "gateway_request_id": req.gateway_request_id,
                "status": "ERROR" if outcome.failed else "OK",
                "payload": outcome.error_body if outcome.failed else outcome.output,
                "error": f"Invalid status code: {outcome.status_code}" if outcome.failed else None,
                "payload_error": payload_error,
            }
            if payload_error is not None:
                body["payload"] = None
            return json.dumps(body, sort_keys=True).encode()

    def send_webhook(
        self, request_id: str, *, payload_error: str | None = None, url: str | None = None
    ) -> int:
        """POST the webhook of a COMPLETED request now; returns the HTTP status received.

        To the ``fal_webhook`` URL given at submit (or ``url``), with ``signer`` headers,
        ``Content-Type: application/json``, redirects not followed (W§2: a 3xx is a failure)
        and a ``webhook_timeout`` (15 s, W§2). Transport errors are recorded and re-raised.
        """
        with self._lock:
            target = url or self._get(request_id).webhook_url
        if target is None:
            raise ValueError(f"request {request_id} has no fal_webhook URL")
        body = self.webhook_body(request_id, payload_error=payload_error)
        headers = {"Content-Type": "application/json"}
        if self.signer is not None:
            headers.update(self.signer(body))
        status_code: int | None = None
        error: str | None = None
        try:
            with httpx.Client(
                timeout=self.webhook_timeout, follow_redirects=False, trust_env=False
            ) as client:
                status_code = client.post(target, content=body, headers=headers).status_code
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            delivery = WebhookDelivery(
                request_id, target, body, headers, status_code, error, time.time()
            )
            with self._lock:
                self._deliveries.append(delivery)
        assert status_code is not None
        return status_code

    @property
    def webhook_deliveries(self) -> list[WebhookDelivery]:
        """Every webhook POST made so far, oldest first."""
        with self._lock:
            return list(self._deliveries)

    def wait_for_webhooks(self, count: int, *, timeout: float = 5.0) -> list[WebhookDelivery]:
        """Wait until at least ``count`` webhook POSTs have finished; returns them all."""
        wait_until(
            lambda: len(self.webhook_deliveries) >= count,
            timeout=timeout,
            what=f"{count} webhook deliveries",
        )
        return self.webhook_deliveries

    def _deliver_in_background(self, request_id: str) -> None:
        def deliver() -> None:
            try:
                self.send_webhook(request_id)
            except Exception:  # recorded as a WebhookDelivery with an error
                return

        thread = threading.Thread(target=deliver, name=f"fal-webhook:{request_id}", daemon=True)
        self._delivery_threads.append(thread)
        thread.start()

    # ------------------------------------------------------------------ log

    def requests(
        self, route: RouteName | None = None, *, request_id: str | None = None
    ) -> list[RecordedRequest]:
        """The requests received (oldest first), optionally of one route and/or request."""
        with self._lock:
            return [
                r
                for r in self._log
                if (route is None or r.route == route)
                and (request_id is None or r.request_id == request_id)
            ]

    def count(self, route: RouteName | None = None, *, request_id: str | None = None) -> int:
        return len(self.requests(route, request_id=request_id))

    def counts(self) -> dict[str, int]:
        """Requests received per route (every route in `ROUTES`, zeros included)."""
        with self._lock:
            result: dict[str, int] = dict.fromkeys(ROUTES, 0)
            for r in self._log:
                result[r.route] += 1
            return result

    def status_polls(self, request_id: str) -> int:
        """Status requests received for ``request_id``, whatever they were answered."""
        return self.count("status", request_id=request_id)

    def result_fetches(self, request_id: str) -> int:
        return self.count("result", request_id=request_id)

    def clear_log(self) -> None:
        with self._lock:
            self._log.clear()

    def wait_for_requests(
        self,
        count: int,
        route: RouteName | None = None,
        *,
        request_id: str | None = None,
        timeout: float = 5.0,
    ) -> list[RecordedRequest]:
        """Wait until at least ``count`` matching requests were received; returns them."""
        wait_until(
            lambda: self.count(route, request_id=request_id) >= count,
            timeout=timeout,
            what=f"{count} {route or 'any'} requests",
        )
        return self.requests(route, request_id=request_id)

    # ------------------------------------------------------------------ internals

    def _get(self, request_id: str) -> FakeRequest:
        try:
            return self._requests[request_id]
        except KeyError:
            raise KeyError(f"unknown request {request_id}") from None

    def _outcome(
        self,
        output: Any,
        error: str | None,
        error_type: str | None,
        status_code: int | None,
        error_body: Any,
        headers: Mapping[str, str] | None,
        inference_time: float | None,
    ) -> _Outcome:
        extra = dict(headers or {})
        timing = 0.5 if inference_time is None else inference_time
        failed = (
            error is not None
            or error_type is not None
            or error_body is not None
            or (status_code is not None and status_code >= 400)
        )
        if not failed:
            body = self.default_output if output is None else output
            return _Outcome(
                output=copy.deepcopy(body),
                status_code=status_code or 200,
                headers=extra,
                inference_time=timing,
            )
        code = status_code or ERROR_TYPE_STATUS.get(error_type or "", 500)
        message = error or error_type or f"Invalid status code: {code}"
        if error_body is None:
            error_body = {"detail": message}
            if error_type is not None:
                error_body["error_type"] = error_type
        if error_type is not None:
            extra.setdefault("X-Fal-Error-Type", error_type)
        return _Outcome(
            error=message,
            error_type=error_type,
            status_code=code,
            error_body=copy.deepcopy(error_body),
            headers=extra,
            inference_time=timing,
        )

    def _log_line(self, req: FakeRequest, message: str) -> None:
        req.logs.append(
            {"message": message, "level": "INFO", "source": "user", "timestamp": _now_iso()}
        )

    def _to_in_progress(self, req: FakeRequest) -> None:
        req.state = "IN_PROGRESS"
        req.polls_in_state = 0
        self._log_line(req, "Request started by FakeFalQueue")

    def _to_completed(self, req: FakeRequest, outcome: _Outcome | None) -> None:
        req.state = "COMPLETED"
        req.polls_in_state = 0
        req.completed_at = time.time()
        req.outcome = outcome or self._outcome(None, None, None, None, None, None, None)
        self._log_line(req, "Request failed" if req.outcome.failed else "Request completed")
        if self.auto_webhook and req.webhook_url and not req.webhook_withheld:
            self._deliver_in_background(req.request_id)

    def _queue_position(self, req: FakeRequest) -> int:
        if req.queue_position is not None:
            return req.queue_position
        return sum(
            1
            for other in self._requests.values()
            if other.state == "IN_QUEUE"
            and other.endpoint.app_prefix == req.endpoint.app_prefix
            and other.seq < req.seq
        )

    def _take_failure(self, route: RouteName) -> _Failure | None:
        for failure in self._failures:
            if failure.route is None or failure.route == route:
                if failure.remaining is not None:
                    failure.remaining -= 1
                    if failure.remaining <= 0:
                        self._failures.remove(failure)
                return failure
        return None

    def _auth_error(self, headers: Mapping[str, str]) -> Response | None:
        """401 without a valid ``Authorization: Key <key>``; 403 for a forbidden key."""
        if self.api_key is None:
            return None
        scheme, _, key = headers.get("authorization", "").partition(" ")
        if scheme != "Key" or not key:
            return JSONResponse(
                {"detail": "Missing or malformed Authorization header (expected 'Key <key>')"},
                401,
            )
        if key in self.forbidden_keys:
            return JSONResponse({"detail": "This key is not allowed to perform this action"}, 403)
        if key != self.api_key:
            return JSONResponse({"detail": "Invalid API key"}, 401)
        return None

    async def _endpoint(self, request: Request) -> Response:
        path = request.url.path
        if path == HEALTH_PATH and request.method == "GET":
            return JSONResponse({"ok": True})
        body = await request.body()
        headers = {k.lower(): v for k, v in request.headers.items()}
        params = dict(request.query_params)
        route, prefix, rid = _classify(request.method, path)
        if rid is not None and (route, rid) in self._stalled:
            await self._hold(route, rid)
        arrived, arrived_mono = time.time(), time.monotonic()
        with self._lock:
            response, rid = self._dispatch(route, path, prefix, rid, params, headers, body)
            self._log.append(
                RecordedRequest(
                    method=request.method,
                    path=path,
                    query=request.url.query,
                    params=params,
                    headers=headers,
                    body=body,
                    route=route,
                    request_id=rid,
                    status_code=response.status_code,
                    at=arrived,
                    monotonic=arrived_mono,
                )
            )
        return response

    async def _hold(self, route: RouteName, rid: str) -> None:
        with self._lock:
            self._holding += 1
        try:
            # Polled, not an asyncio.Event: `unstall` runs in the test's thread, not this loop.
            while (route, rid) in self._stalled:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        finally:
            with self._lock:
                self._holding -= 1

    def _dispatch(
        self,
        route: RouteName,
        path: str,
        prefix: str | None,
        rid: str | None,
        params: Mapping[str, str],
        headers: Mapping[str, str],
        body: bytes,
    ) -> tuple[Response, str | None]:
        failure = self._take_failure(route)
        if failure is not None:
            return JSONResponse(failure.body, failure.status_code, failure.headers), rid
        denied = self._auth_error(headers)
        if denied is not None:
            return denied, rid
        if route == "submit":
            return self._submit(path, params, headers, body)
        if route == "other":
            return JSONResponse({"detail": "Method Not Allowed"}, 405), rid
        assert rid is not None and prefix is not None
        req = self._requests.get(rid)
        if req is not None and self.strict_paths and prefix != req.endpoint.app_prefix:
            req = None
        if route == "cancel":
            return self._cancel(req), rid
        if req is None:
            return JSONResponse({"detail": f"Request {rid} not found"}, 404), rid
        if route == "status":
            return self._status(req, params), rid
        if route == "result":
            return self._result(req), rid
        return JSONResponse({"detail": "status streaming is not implemented by the fake"}, 501), rid

    def _submit(
        self, path: str, params: Mapping[str, str], headers: Mapping[str, str], body: bytes
    ) -> tuple[Response, str | None]:
        """Submit (W§4 "Endpoints", Q "Submit a Request"): 200 with the request's URLs."""
        endpoint_id = path.strip("/")
        try:
            parse_endpoint_id(endpoint_id)
        except ValueError as exc:
            return JSONResponse({"detail": str(exc)}, 404), None
        try:
            payload: Any = json.loads(body) if body else None
        except ValueError:
            payload = None
        rid = self.create(
            endpoint_id,
            input=payload,
            webhook_url=params.get("fal_webhook"),
            platform_headers={k: v for k, v in headers.items() if k.startswith("x-fal-")},
        )
        req = self._requests[rid]
        req.query = dict(params)
        content = {
            "status": "IN_QUEUE",
            "request_id": rid,
            **self.request_urls(rid),
            "queue_position": self._queue_position(req),
        }
        return JSONResponse(content, 200), rid

    def _status(self, req: FakeRequest, params: Mapping[str, str]) -> Response:
        """Status (W§4, Q "Check Status"): 202 while queued or running, 200 when COMPLETED."""
        with_logs = params.get("logs", "0") not in ("", "0", "false")
        urls = self.request_urls(req.request_id)
        content: dict[str, Any] = {
            "status": req.state,
            "request_id": req.request_id,
            **urls,
        }
        if req.state == "IN_QUEUE":
            content["queue_position"] = self._queue_position(req)
            if with_logs:
                content["logs"] = []
        else:
            content["logs"] = copy.deepcopy(req.logs) if with_logs else None
        if req.state == "COMPLETED" and req.outcome is not None:
            content["metrics"] = {"inference_time": req.outcome.inference_time}
            if req.outcome.failed:
                content["error"] = req.outcome.error
                content["error_type"] = req.outcome.error_type
        response = JSONResponse(content, 200 if req.state == "COMPLETED" else 202)
        self._count_poll(req)
        return response

    def _count_poll(self, req: FakeRequest) -> None:
        """Automatic progress: each state is answered to N polls, then the request moves on."""
        every = (
            req.auto_advance_after
            if req.auto_advance_after is not None
            else self.auto_advance_after
        )
        if every is None or req.state == "COMPLETED":
            return
        req.polls_in_state += 1
        if req.polls_in_state >= every:
            if req.state == "IN_QUEUE":
                self._to_in_progress(req)
            else:
                self._to_completed(req, req.planned)

    def _result(self, req: FakeRequest) -> Response:
        """Result (S9 "Get request result", W§4): what the model returned, status and all."""
        if req.state != "COMPLETED" or req.outcome is None:
            return JSONResponse(
                {"detail": "Request is still in progress"}, self.incomplete_result_status
            )
        if req.expired is not None:
            status_code, body = req.expired
            return JSONResponse(body, status_code)
        if req.raw_result is not None:
            status_code, content_type, raw = req.raw_result
            if isinstance(raw, bytes):
                return Response(raw, status_code, media_type=content_type)
            return StreamingResponse(raw(), status_code, media_type=content_type)
        outcome = req.outcome
        if outcome.failed:
            return JSONResponse(outcome.error_body, outcome.status_code, outcome.headers)
        return JSONResponse(outcome.output, outcome.status_code, outcome.headers)

    def _cancel(self, req: FakeRequest | None) -> Response:
        """Cancel (W§4, Q "Cancel a Request"): 202 / 400 ALREADY_COMPLETED / 404 NOT_FOUND.

        A cancelled IN_QUEUE request "is never processed" (Q); what its status then says is
        not documented: the fake completes it with ``error_type`` ``client_cancelled`` (499,
        S6). An IN_PROGRESS one only gets ``cancel_requested`` set; the test decides.
        """
        if req is None:
            return JSONResponse({"status": "NOT_FOUND"}, 404)
        if req.state == "COMPLETED":
            return JSONResponse({"status": "ALREADY_COMPLETED"}, 400)
        req.cancel_requested = True
        if req.state == "IN_QUEUE":
            self._to_completed(
                req,
                self._outcome(None, "Request cancelled", "client_cancelled", None, None, None, 0.0),
            )
        return JSONResponse({"status": "CANCELLATION_REQUESTED"}, 202)
