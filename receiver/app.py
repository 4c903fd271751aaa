"""The receiver: an app factory, and the object users register callbacks on and mount."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.types import Receive, Scope, Send

from falhook import __version__
from falhook.receiver.deadlines import Deadlines
from falhook.receiver.dispatcher import Dispatcher, DispatchObserver, Drained
from falhook.receiver.durations import format_time
from falhook.receiver.errors import (
    NotStartedError,
    RecoveryDisabledError,
    StoreUnavailableError,
)
from falhook.receiver.forward import Forwarder
from falhook.receiver.intake import Accepted, Intake
from falhook.receiver.keysource import KeySource
from falhook.receiver.logs import delivery_log
from falhook.receiver.memtrim import MemoryTrimmer
from falhook.receiver.metrics import Metrics
from falhook.receiver.models import Delivery
from falhook.receiver.pause import PauseWatcher
from falhook.receiver.pruner import Pruner
from falhook.receiver.registry import Callback, CallbackRegistry
from falhook.receiver.retry import RetryPolicy
from falhook.receiver.routes import WebhookEndpoint, healthz, metrics, not_found, readyz
from falhook.receiver.settings import WEBHOOK_PATH, Settings, without_password
from falhook.receiver.store import Claim, Store
from falhook.receiver.store.control import CONTROL_CHANNEL, DispatchControl
from falhook.receiver.store.engine import sqlite_file
from falhook.receiver.store.expectations import Expectations, ExpectationState
from falhook.receiver.store.listener import Listener
from falhook.receiver.watchdog import LoopWatchdog
from falhook.verify import KeysUnavailableError, WebhookHeaders

if TYPE_CHECKING:
    from falhook.receiver.recovery import Recovery

__all__ = ["WebhookReceiver", "create_app"]

log = logging.getLogger("falhook.receiver")
_READY_TIMEOUT = 1.5  # seconds for the store to answer /readyz
_RECENT_FAILURE = 5.0  # seconds /readyz stays 503 after a delivery could not be stored


class _Observer(DispatchObserver):
    def __init__(self, metrics: Metrics, trimmer: MemoryTrimmer) -> None:
        self.metrics = metrics
        self.trimmer = trimmer

    def started(self, delivery: Delivery) -> None:
        self.metrics.callback_attempts.inc()
        if delivery.attempt == 1:
            self.metrics.dispatch_latency.observe(
                max(0.0, time.time() - delivery.received_at.timestamp())
            )

    def timed_out(self, callback: str) -> None:
        self.metrics.callback_timeouts.labels(callback).inc()

    def called(self, callback: str, seconds: float, outcome: str) -> None:
        self.metrics.called(callback, seconds, outcome)

    def abandoned(self, threads: int) -> None:
        self.metrics.callback_threads_abandoned.set(threads)

    def finished(
        self,
        claim: Claim,
        outcome: str,
        error: str | None,
        *,
        next_attempt_at: float | None = None,
    ) -> None:
        self.metrics.outcome(outcome)
        self.trimmer.finished(len(claim.body))
        level = logging.INFO if outcome == "done" else logging.WARNING
        if delivery_log.isEnabledFor(level):
            fields: dict[str, Any] = {
                "request_id": claim.request_id,
                "outcome": outcome,
                "attempt": claim.attempt,
                "error": error,
            }
            message = "callbacks %s"
            if next_attempt_at is not None:
                fields["next_attempt_at"] = format_time(next_attempt_at)
                fields["retry_in_seconds"] = round(max(0.0, next_attempt_at - time.time()), 3)
                message += f" (next attempt at {fields['next_attempt_at']})"
            delivery_log.log(level, message, outcome, fields)


class WebhookReceiver:
    """A fal webhook receiver: verify → store → 200 → callbacks, with retries.

    ::

        hooks = WebhookReceiver(Settings.from_env())

        @hooks.on_ok
        async def save(delivery): ...

        app = hooks.app                      # run it, or
        host = FastAPI(lifespan=hooks.lifespan)
        host.mount("/fal", hooks.app)        # mount it (the host must run hooks.lifespan)

    Starting (its lifespan, or ``async with hooks:``) opens the store and starts the
    dispatcher; a delivery that arrives before that gets a 503 ``receiver_not_started``.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        callbacks: Iterable[Callback] = (),
        listen: str | None = None,
    ) -> None:
        self.settings = settings if settings is not None else Settings.from_env()
        self.listen = listen  # where `falhook serve` listens, for the startup log line
        self.registry = CallbackRegistry()
        self.registry.add_specs(self.settings.callbacks)
        for fn in callbacks:
            self.registry.add(fn)
        self._forwarder: Forwarder | None = None
        if self.settings.forward_to:
            self._forwarder = Forwarder(
                self.settings.forward_to, secret=self.settings.forward_secret
            )
            self.registry.add(self._forwarder, name=f"forward-to:{self.settings.forward_to}")
        self.on_ok = self.registry.on_ok
        self.on_error = self.registry.on_error
        self.on_delivery = self.registry.on_delivery
        self.metrics = Metrics()
        # The hot path's timeouts (body read, commit, callbacks) share one timer.
        self.deadlines = Deadlines()
        self.metrics.watch_store(
            lambda: self.store.counts(),
            lambda: self.store.oldest_pending_age(),
            lambda: (self.keys.fetches, self.keys.fetch_failures) if self._keys else (0, 0),
        )
        self._store: Store | None = None
        self._keys: KeySource | None = None
        self._dispatcher: Dispatcher | None = None
        self._listener: Listener | None = None
        self._watchdog: LoopWatchdog | None = None
        self._pruner: Pruner | None = None
        self._intake: Intake | None = None
        self._warm_keys_task: asyncio.Task[None] | None = None
        self._started_at = time.monotonic()
        self._pause: PauseWatcher | None = None
        self._starts = 0
        # Recovery from fal's queue (submit, expect, the poller): only with a fal key.
        self.recovery: Recovery | None = None
        self._expectations: Expectations | None = None
        if self.settings.recovery_enabled:
            from falhook.receiver.recovery import Recovery

            self.metrics.enable_recovery(self._expectation_counts)
            self.recovery = Recovery(
                self.settings,
                observe_call=self.metrics.queue_request,
                on_recovered=self.metrics.recovered.inc,
            )
        # Gives freed memory back to the system after large bodies (glibc only).
        self.trimmer = MemoryTrimmer()
        self.app = self._build_app()

    # -- what the routes use -----------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._starts > 0

    def check_headers(self, headers: Iterable[tuple[bytes, bytes]]) -> WebhookHeaders:
        """Everything a delivery's headers alone decide, before its body is read.

        `headers` are the request's (name, value) byte pairs, names lowercase (ASGI's).
        :raises WebhookVerificationError: inauthentic (401).
        :raises NotStartedError: before `start()` (503).
        """
        if self._intake is None:
            raise NotStartedError()
        return self._intake.keys.check_headers(headers)

    async def accept(self, body: bytes, checked: WebhookHeaders) -> Accepted:
        """Verify, parse and durably store one delivery whose headers `check_headers`
        passed; it is then dispatched from the store. Raises what `Intake.accept` raises,
        or `NotStartedError` before `start()`."""
        intake = self._intake
        if intake is None:
            raise NotStartedError()
        return await intake.accept(body, checked)

    async def ready(self) -> None:
        """Raise unless deliveries can be accepted now: started, store and keys reachable."""
        intake = self._intake
        if intake is None:
            raise NotStartedError()
        try:
            # A probe must get its answer quickly, even when the store waits on a lock.
            async with asyncio.timeout(_READY_TIMEOUT):
                await self.store.ping()  # a write: a full disk fails it
        except TimeoutError:
            raise StoreUnavailableError(f"no answer within {_READY_TIMEOUT:g} s") from None
        # The probe's one-row write may still fit where a delivery no longer does (a full
        # disk with room left in the WAL): a delivery that could not be stored counts.
        if time.monotonic() - intake.store_failed_at < _RECENT_FAILURE:
            raise StoreUnavailableError("a delivery could not be stored in the last few seconds")
        try:
            # A slow JWKS (a fetch may take FALHOOK_JWKS_TIMEOUT_SECONDS) must not hold the
            # probe either; the fetch goes on for the deliveries that wait for it.
            async with asyncio.timeout(_READY_TIMEOUT):
                await self.keys.ready()
        except TimeoutError:
            raise KeysUnavailableError(f"keys not loaded within {_READY_TIMEOUT:g} s") from None

    @property
    def store(self) -> Store:
        """The open store; raises NotStartedError before `start()`."""
        if self._store is None:
            raise NotStartedError()
        return self._store

    @property
    def keys(self) -> KeySource:
        """The key source; raises NotStartedError before `start()`."""
        if self._keys is None:
            raise NotStartedError()
        return self._keys

    @property
    def dispatcher(self) -> Dispatcher | None:
        return self._dispatcher

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and start the dispatcher. Nested starts are counted."""
        self._starts += 1
        if self._starts > 1:
            return
        settings = self.settings
        self._watchdog = LoopWatchdog(
            asyncio.get_running_loop(),
            self.registry.on_loop,
            on_lag=self.metrics.loop_lag.observe,
            on_blocked=lambda callback: self.metrics.loop_blocked.labels(callback).inc(),
        )
        self._watchdog.start()
        self._keys = KeySource(
            settings.jwks_url,
            user_id=settings.user_id,
            tolerance=settings.tolerance_seconds,
            timeout=settings.jwks_timeout_seconds,
            min_refresh_interval=settings.jwks_refresh_seconds,
        )
        # Load the keys now, beside the rest of start-up: the first delivery then finds them
        # cached, and a JWKS that cannot be had is a warning at start, not a surprise later.
        self._warm_keys_task = asyncio.create_task(self._warm_keys(), name="falhook-keys")
        store = Store(settings.database_url, on_due=self._wake)
        store.start()
        self._store = store
        try:
            await store.ping()  # create or upgrade the schema now, not on the first delivery
        except StoreUnavailableError as exc:
            log.warning("store unavailable at start (will keep trying): %s", exc)
        if len(self.registry):
            self._dispatcher = Dispatcher(
                store,
                self.registry,
                policy=RetryPolicy(
                    max_attempts=settings.callback_max_attempts,
                    base_delay=settings.callback_backoff_seconds,
                    max_delay=settings.callback_backoff_max_seconds,
                ),
                lease_seconds=settings.lease_seconds,
                concurrency=settings.concurrency,
                poll_seconds=settings.poll_seconds,
                shutdown_timeout=settings.shutdown_timeout_seconds,
                callback_timeout=settings.callback_timeout_seconds,
                deadlines=self.deadlines,
                observer=_Observer(self.metrics, self.trimmer),
                prepare=self.recovery.prepare if self.recovery is not None else None,
            )
            # Held until the store's pause switch has been read: a replica starting while
            # dispatch is paused must not claim a batch first.
            self._dispatcher.pause()
        self._pause = PauseWatcher(store, self._apply_pause)
        await self._pause.start()
        if store.dialect == "postgresql":
            # Wake-ups from the other replicas' inserts, and changes of the pause switch.
            self._listener = Listener(
                settings.database_url, self._wake, also={CONTROL_CHANNEL: self._pause.poke}
            )
            self._listener.start()
        if self._dispatcher is not None:
            self._dispatcher.start()
        else:
            log.warning(
                "no callbacks registered: deliveries are stored and stay pending until a "
                "receiver with callbacks runs"
            )
        self._intake = Intake(
            self._keys,
            store,
            self._dispatcher,
            lease_seconds=settings.lease_seconds,
            store_timeout=settings.store_timeout_seconds,
            deadlines=self.deadlines,
        )
        if settings.retention > 0:
            self._pruner = Pruner(store, settings.retention)
            self._pruner.start()
        if self.recovery is not None:
            self._expectations = Expectations(store)
            self.recovery.start(store)
            if settings.public_url is None:
                log.warning(
                    "FALHOOK_PUBLIC_URL is not set: hooks.submit sends no webhook URL to fal, "
                    "so its results arrive only by recovery from the queue"
                )
        self._started_at = time.monotonic()
        self._log_started()

    def _log_started(self) -> None:
        """One line with everything an operator checks first: what runs, where, with what."""
        settings = self.settings
        keys = self.keys
        store = without_password(settings.database_url)
        path = sqlite_file(settings.database_url)
        if path is not None and not path.is_absolute():
            store = f"{store} ({path.resolve()})"  # relative to where it was started
        console = None
        if settings.console_token:
            console = f"{self.listen}/console/" if self.listen else "/console/ (mounted)"
        fields: dict[str, Any] = {
            "version": __version__,
            "listen": self.listen or "mounted in the host application",
            "store": store,
            "jwks": f"file {settings.jwks_url}" if keys.is_file else settings.jwks_url,
            "user_id": settings.user_id,
            "callbacks": [n for n in self.registry.names if not n.startswith("forward-to:")],
            "forward_to": settings.forward_to,
            "forward_signed": self._forwarder is not None and self._forwarder.signed,
            "concurrency": settings.concurrency,
            "recovery": settings.queue_url if self.recovery is not None else None,
            "console": console,
        }
        targets = list(fields["callbacks"])
        if settings.forward_to:
            signed = "signed" if fields["forward_signed"] else "unsigned"
            targets.append(f"forwarding to {settings.forward_to} ({signed})")
        log.info(
            "falhook %s started: %s, store %s, keys %s, user id %s, %s, concurrency %d%s",
            __version__,
            fields["listen"],
            fields["store"],
            fields["jwks"],
            settings.user_id or "not pinned",
            ", ".join(targets) if targets else "no callbacks",
            settings.concurrency,
            f", console {console}" if console else "",
            extra=fields,
        )
        if not settings.user_id:
            log.warning(
                "FALHOOK_USER_ID is not set: deliveries fal signed for any fal user are "
                "accepted; set it to your fal user id"
            )

    async def _warm_keys(self) -> None:
        try:
            await self.keys.ready()
        except KeysUnavailableError as exc:
            log.warning(
                "keys unavailable at start (deliveries are answered 503 until they load; "
                "fetched again as deliveries arrive): %s",
                exc,
            )

    async def stop(self) -> None:
        """Stop claiming, let running callbacks finish (up to the timeout), close the store."""
        if self._starts == 0:
            return
        self._starts -= 1
        if self._starts > 0:
            return
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        self.trimmer.close()
        if self._pruner is not None:
            await self._pruner.stop()
            self._pruner = None
        self._intake = None
        if self._warm_keys_task is not None:
            self._warm_keys_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._warm_keys_task
            self._warm_keys_task = None
        if self.recovery is not None:
            await self.recovery.stop()
            self._expectations = None
        if self._listener is not None:
            await self._listener.stop()
            self._listener = None
        drained = Drained(0, 0)
        if self._pause is not None:
            await self._pause.stop()
            self._pause = None
        if self._dispatcher is not None:
            drained = await self._dispatcher.stop()
            self._dispatcher = None
        if self._store is not None:
            await self._store.stop()
            self._store = None
        if self._forwarder is not None:
            await self._forwarder.aclose()
        if self._keys is not None:
            await self._keys.aclose()
        log.info(
            "falhook stopped after %.0f s: %d deliveries in flight finished, %d cancelled "
            "(retaken when their leases expire); the store's queued writes were committed",
            time.monotonic() - self._started_at,
            drained.finished,
            drained.cancelled,
            extra={"finished": drained.finished, "cancelled": drained.cancelled},
        )

    async def __aenter__(self) -> WebhookReceiver:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[None]:
        """A Starlette/FastAPI lifespan: ``FastAPI(lifespan=hooks.lifespan)``."""
        async with self:
            yield

    # -- dispatch control ----------------------------------------------------------------

    async def pause(self, reason: str | None = None, *, by: str = "api") -> DispatchControl:
        """Pause dispatch on every replica of this store: deliveries are still received,
        stored and acknowledged, running callbacks finish, no new callback starts."""
        control = await asyncio.to_thread(
            self.store.set_dispatch_paused, True, reason=reason, by=by
        )
        if self._pause is not None:
            self._pause.seen(control)
        return control

    async def resume(self, *, by: str = "api") -> DispatchControl:
        """Resume dispatch on every replica; the backlog drains at the normal concurrency."""
        control = await asyncio.to_thread(self.store.set_dispatch_paused, False, by=by)
        if self._pause is not None:
            self._pause.seen(control)
        return control

    async def dispatch_control(self) -> DispatchControl:
        """The store-wide switch, read now."""
        return await asyncio.to_thread(self.store.dispatch_control)

    @property
    def dispatch_paused(self) -> bool | None:
        """The switch as this replica last saw it (None before it was first read)."""
        current = self._pause.current if self._pause is not None else None
        return None if current is None else current.paused

    def _apply_pause(self, control: DispatchControl) -> None:
        self.metrics.dispatch_paused.set(1 if control.paused else 0)
        if self._dispatcher is not None:
            if control.paused:
                self._dispatcher.pause()
            else:
                self._dispatcher.resume()

    # -- recovery from fal's queue (with a fal key) -------------------------------------

    def _recovery(self) -> Recovery:
        if self.recovery is None:
            raise RecoveryDisabledError()
        return self.recovery

    async def submit(
        self,
        endpoint_id: str,
        arguments: Any,
        *,
        priority: str | None = None,
        start_timeout: float | None = None,
        hint: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """Submit a request to fal's queue with this receiver's webhook URL
        (FALHOOK_PUBLIC_URL + /webhooks/fal), and expect its result: if no webhook brings
        it, it is fetched from the queue. Returns fal's answer, ``request_id`` first.

        Raises RecoveryDisabledError without a fal key, QueueError if fal refused it.
        """
        return await self._recovery().submit(
            endpoint_id,
            arguments,
            priority=priority,
            start_timeout=start_timeout,
            hint=hint,
            headers=headers,
        )

    def submit_sync(
        self,
        endpoint_id: str,
        arguments: Any,
        *,
        priority: str | None = None,
        start_timeout: float | None = None,
        hint: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """`submit` for code without an event loop."""
        return self._recovery().submit_sync(
            endpoint_id,
            arguments,
            priority=priority,
            start_timeout=start_timeout,
            hint=hint,
            headers=headers,
        )

    async def expect(
        self,
        request_id: str,
        endpoint_id: str,
        *,
        status_url: str | None = None,
        response_url: str | None = None,
    ) -> bool:
        """Expect the result of a request submitted elsewhere: if no delivery comes, it is
        fetched from fal's queue. True if newly recorded."""
        return await self._recovery().expect(
            request_id, endpoint_id, status_url=status_url, response_url=response_url
        )

    def expect_sync(
        self,
        request_id: str,
        endpoint_id: str,
        *,
        status_url: str | None = None,
        response_url: str | None = None,
    ) -> bool:
        """`expect` for code without an event loop."""
        return self._recovery().expect_sync(
            request_id, endpoint_id, status_url=status_url, response_url=response_url
        )

    def _expectation_counts(self) -> dict[ExpectationState, int]:
        if self._expectations is None:
            raise NotStartedError()
        return self._expectations.counts()

    def _wake(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.wake()

    def _build_app(self) -> ReceiverApp:
        settings = self.settings
        endpoint = WebhookEndpoint(
            self.check_headers,
            self.accept,
            self.metrics,
            max_body=settings.max_body_bytes,
            max_buffered=settings.max_buffered_bytes,
            body_timeout=settings.body_timeout_seconds,
            log_payloads=settings.log_payloads,
            deadlines=self.deadlines,
            trimmer=self.trimmer,
        )
        routes: list[BaseRoute] = [
            # Both spellings are served: fal treats any redirect (3xx) as a permanent failure.
            Route(WEBHOOK_PATH, endpoint),
            Route(WEBHOOK_PATH + "/", endpoint),
            Route("/healthz", healthz, methods=["GET", "HEAD"]),
            Route("/readyz", readyz, methods=["GET", "HEAD"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
        if self.settings.console_token:
            from falhook.receiver.console import build_console  # jinja2 only when used

            console = build_console(self, self.settings.console_token)
            routes += [
                Route("/console", _to_console, methods=["GET", "HEAD"]),
                Mount("/console", app=console, name="console"),
            ]
        app = Starlette(
            routes=routes,
            lifespan=self.lifespan,
            exception_handlers={HTTPException: _http_error},
        )
        router: Router = app.router
        router.redirect_slashes = False
        router.default = not_found
        app.state.falhook = self
        return ReceiverApp(app, endpoint)


class ReceiverApp:
    """The receiver's ASGI app: the webhook path goes straight to its endpoint.

    Every delivery would otherwise pass Starlette's error and exception middleware and
    its router (each wrapping ``send``) — measured with bench/ at about a tenth of the
    per-request CPU. The endpoint answers every outcome itself, including its own errors,
    so those layers add nothing there. Everything else (health, metrics, 404s, and the
    lifespan) is the Starlette app, `.starlette`.
    """

    def __init__(self, starlette: Starlette, endpoint: WebhookEndpoint) -> None:
        self.starlette = starlette
        self.endpoint = endpoint
        self.state = starlette.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _route_path(scope) in _WEBHOOK_PATHS:
            await self.endpoint(scope, receive, send)
        else:
            await self.starlette(scope, receive, send)


_WEBHOOK_PATHS = frozenset((WEBHOOK_PATH, WEBHOOK_PATH + "/"))


def _route_path(scope: Scope) -> str:
    """The path below where the app is mounted (as Starlette's router computes it)."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if (
        root_path
        and path.startswith(root_path)
        and path != root_path
        and path[len(root_path)] == "/"
    ):
        return path[len(root_path) :]
    return path


async def _to_console(request: Request) -> Response:
    return RedirectResponse(request.url.path + "/", status_code=308)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(
        {"error": error, "detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
    )


def create_app(
    settings: Settings | None = None, *, callbacks: Iterable[Callback] = ()
) -> ReceiverApp:
    """Build a receiver and return its ASGI app (the receiver is ``app.state.falhook``)."""
    return WebhookReceiver(settings, callbacks=callbacks).app
