"""The receiver: an app factory, and the object users register callbacks on and mount."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable
from types import MethodType, TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    Generic,
    NoReturn,
    ParamSpec,
    Self,
    TypeVar,
    overload,
)

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
from starlette.types import Receive, Scope, Send

from falhook import __version__
from falhook.receiver.archive.media import MediaState
from falhook.receiver.deadlines import Deadlines
from falhook.receiver.dispatcher import Dispatcher, Drained
from falhook.receiver.errors import (
    NotStartedError,
    ReceiverError,
    RecoveryDisabledError,
    StoreUnavailableError,
)
from falhook.receiver.forward import Forwarder
from falhook.receiver.intake import Intake
from falhook.receiver.keysource import KeySource
from falhook.receiver.memtrim import MemoryTrimmer
from falhook.receiver.metrics import Metrics
from falhook.receiver.notify import NoticeKind, Notifier
from falhook.receiver.observer import MetricsObserver
from falhook.receiver.pause import PauseWatcher
from falhook.receiver.pruner import Pruner
from falhook.receiver.readiness import StoreProbe
from falhook.receiver.recovery.service import Recovery
from falhook.receiver.registry import Callback, CallbackRegistry
from falhook.receiver.retry import RetryPolicy
from falhook.receiver.routes import NotFound, WebhookEndpoint, healthz, metrics, readyz
from falhook.receiver.settings import WEBHOOK_PATH, Settings, without_password
from falhook.receiver.state import State
from falhook.receiver.store import Store
from falhook.receiver.store.control import CONTROL_CHANNEL, DispatchControl
from falhook.receiver.store.engine import sqlite_file
from falhook.receiver.store.expectations import Expectations, ExpectationState
from falhook.receiver.store.listener import Listener
from falhook.receiver.tracing import resolve as resolve_tracing
from falhook.receiver.watchdog import LoopWatchdog
from falhook.verify import KeysUnavailableError

if TYPE_CHECKING:
    from falhook.receiver.archive import Archiver
    from falhook.receiver.console.charts import History
    from falhook.receiver.tracing.spans import Tracing

__all__ = ["WebhookReceiver", "create_app"]

log = logging.getLogger("falhook.receiver")
_READY_TIMEOUT = 1.5  # seconds for the keys to answer /readyz
_P = ParamSpec("_P")
_R = TypeVar("_R")


class _RecoveryMethod(Generic[_P, _R]):
    """A method of the receiver's `Recovery`, read as the receiver's own: ``hooks.submit``
    is ``hooks.recovery.submit``; without a fal key, calling it raises
    RecoveryDisabledError."""

    def __init__(self, method: Callable[Concatenate[Recovery, _P], _R]) -> None:
        self.method = method
        self.__doc__ = method.__doc__

    @overload
    def __get__(self, hooks: None, owner: type[Any]) -> Self: ...
    @overload
    def __get__(self, hooks: WebhookReceiver, owner: type[Any]) -> Callable[_P, _R]: ...
    def __get__(self, hooks: WebhookReceiver | None, owner: type[Any]) -> Self | Callable[_P, _R]:
        if hooks is None:
            return self
        if hooks.recovery is None:
            return _recovery_disabled
        bound: Callable[_P, _R] = MethodType(self.method, hooks.recovery)
        return bound


def _recovery_disabled(*args: Any, **kwargs: Any) -> NoReturn:
    raise RecoveryDisabledError()


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

    With OpenTelemetry installed (``falhook[otel]``), spans are recorded with
    `tracer_provider`, else with the global provider if one was set up before the
    receiver started; never a provider of falhook's own over the host's.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        callbacks: Iterable[Callback] = (),
        listen: str | None = None,
        tracer_provider: Any = None,
    ) -> None:
        self.settings = settings if settings is not None else Settings.from_env()
        self.tracer_provider = tracer_provider
        self.tracing: Tracing | None = None  # decided at each start (receiver/tracing/)
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
            # The name is shown (logs, metric labels, the store): the URL without secrets.
            self.registry.add(self._forwarder, name=f"forward-to:{self._forwarder.shown}")
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
        # What a start opens; None while stopped (`store`, `keys` then raise NotStartedError).
        self._store: Store | None = None
        self._keys: KeySource | None = None
        self._dispatcher: Dispatcher | None = None
        self._pause: PauseWatcher | None = None
        self._store_probe: StoreProbe | None = None  # made by `ready`, for this store
        self._expectations: Expectations | None = None
        self._running: contextlib.AsyncExitStack | None = None  # what stop() closes
        self._drained = Drained(0, 0)
        self._started_at = time.monotonic()
        self._starts = 0
        # Recovery from fal's queue (submit, expect, the poller): only with a fal key.
        self.recovery: Recovery | None = None
        if self.settings.recovery_enabled:
            self.metrics.enable_recovery(self._expectation_counts)
            self.recovery = Recovery(
                self.settings,
                observe_call=self.metrics.queue_request,
                on_recovered=self.metrics.recovered.inc,
                on_settled=self._expectation_settled,
                tracer_provider=tracer_provider,
            )
        # The media archive (FALHOOK_ARCHIVE_URL): built at start, on the store's engine.
        self.archiver: Archiver | None = None
        # Gives freed memory back to the system after large bodies (glibc only).
        self.trimmer = MemoryTrimmer()
        # FALHOOK_NOTIFY_URL: told when something breaks (the Notifier runs while started).
        self._notifier: Notifier | None = None
        if self.settings.notify_url:
            self.metrics.enable_notifications()
        # The console's charts: a minute-by-minute history of this process's numbers.
        self.history: History | None = None
        self.app = self._build_app()

    # -- what the routes use -----------------------------------------------------------

    @property
    def started(self) -> bool:
        return self._starts > 0

    async def ready(self) -> None:
        """Raise unless deliveries can be accepted now: started, store and keys reachable."""
        if self.app.endpoint.intake is None:
            raise NotStartedError()
        store = self.store
        if self._store_probe is None or self._store_probe.store is not store:
            self._store_probe = StoreProbe(store)
        await self._store_probe.check()  # could a delivery be stored now (cached, quick)
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
        """Open the store and start the dispatcher (nested starts are counted). If a part
        fails to start, those already started are stopped, in reverse, and it raises."""
        self._starts += 1
        if self._starts > 1:
            return
        try:
            async with contextlib.AsyncExitStack() as parts:
                await self._start_parts(parts)
                self._started_at = time.monotonic()
                self._log_started()
                self._running = parts.pop_all()
        except BaseException:
            self._starts = 0
            raise

    async def _start_parts(self, parts: contextlib.AsyncExitStack) -> None:
        """Start each part in order, pushing onto `parts` what stops it first (a part's stop
        undoes a start that failed halfway too): closing `parts` (stop, or a part failing
        to start) stops them all, in reverse."""
        settings = self.settings
        parts.callback(self._forget_parts)  # last of all: the receiver is stopped
        parts.callback(self._trace, None)  # spans stop with the receiver
        self._trace(resolve_tracing(self.tracer_provider))
        watchdog = LoopWatchdog(
            asyncio.get_running_loop(),
            self.registry.on_loop,
            on_lag=self.metrics.loop_lag.observe,
            on_blocked=lambda callback: self.metrics.loop_blocked.labels(callback).inc(),
        )
        parts.callback(watchdog.stop)
        watchdog.start()
        parts.callback(self.trimmer.close)  # a trim due later is not started
        keys = self._keys = KeySource(
            settings.jwks_url,
            user_id=settings.user_id,
            tolerance=settings.tolerance_seconds,
            timeout=settings.jwks_timeout_seconds,
            min_refresh_interval=settings.jwks_refresh_seconds,
        )
        parts.push_async_callback(keys.aclose)
        if self._forwarder is not None:  # closed once the callbacks using it are over
            parts.push_async_callback(self._forwarder.aclose)
        # Load the keys now, beside the rest of start-up: the first delivery then finds them
        # cached, and a JWKS that cannot be had is a warning at start, not a surprise later.
        warm_keys = asyncio.create_task(_warm_keys(keys), name="falhook-keys")
        parts.push_async_callback(_cancel, warm_keys)
        if settings.notify_url:
            await self._start_notifier(parts, settings.notify_url)
        store = self._store = Store(settings.database_url, on_due=self._wake)
        parts.push_async_callback(store.stop)
        store.start()
        try:
            await store.ping()  # create or upgrade the schema now, not on the first delivery
        except StoreUnavailableError as exc:
            log.warning("store unavailable at start (will keep trying): %s", exc)
        if settings.archive_url is not None:  # closed once the attempts using it are over
            self.archiver = self._start_archive(store)
            parts.push_async_callback(self._stop_archive)
        dispatcher = self._dispatcher = self._new_dispatcher(store)
        pause = self._pause = PauseWatcher(store, self._apply_pause)
        parts.push_async_callback(pause.stop)
        await pause.start()
        if store.dialect == "postgresql":
            # Wake-ups from the other replicas' inserts, and changes of the pause switch.
            listener = Listener(
                settings.database_url, self._wake, also={CONTROL_CHANNEL: pause.poke}
            )
            parts.push_async_callback(listener.stop)
            listener.start()
        if dispatcher is not None:
            parts.push_async_callback(self._drain, dispatcher)
            dispatcher.start()
        else:
            log.warning(
                "no callbacks registered: deliveries are stored and stay pending until a "
                "receiver with callbacks runs"
            )
        self.app.endpoint.intake = Intake(
            keys,
            store,
            dispatcher,
            lease_seconds=settings.lease_seconds,
            store_timeout=settings.store_timeout_seconds,
            deadlines=self.deadlines,
            tracing=self.tracing,
        )
        parts.callback(self._refuse_deliveries)
        if settings.console_token:
            await self._start_sampler(parts, store)
        if settings.retention > 0:
            pruner = Pruner(store, settings.retention)
            parts.push_async_callback(pruner.stop)
            pruner.start()
        if self.recovery is not None:
            self._expectations = Expectations(store)
            parts.push_async_callback(self.recovery.stop)
            self.recovery.start(store)
            if settings.public_url is None:
                log.warning(
                    "FALHOOK_PUBLIC_URL is not set: hooks.submit sends no webhook URL to fal, "
                    "so its results arrive only by recovery from the queue"
                )

    async def _start_notifier(self, parts: contextlib.AsyncExitStack, url: str) -> None:
        """Notifications run from before the dispatcher to after it drained, so a delivery
        that goes dead while stopping is still told."""
        settings = self.settings
        console = None
        if settings.console_token and settings.public_url:
            console = settings.public_url + "/console"
        notifier = self._notifier = Notifier(
            url,
            secret=settings.forward_secret,
            console_url=console,
            on_sent=lambda kind, outcome: self.metrics.notification(kind.value, outcome),
        )
        task = asyncio.create_task(notifier.run(), name="falhook-notify")

        async def stop() -> None:
            self._notifier = None
            await notifier.aclose()
            await task

        parts.push_async_callback(stop)

    def _expectation_settled(
        self, request_id: str, state: ExpectationState, reason: str | None
    ) -> None:
        kind = (
            NoticeKind.EXPECTATION_EXPIRED
            if state is ExpectationState.EXPIRED
            else NoticeKind.EXPECTATION_FAILED
        )
        self.notify(kind, request_id, reason)

    def notify(self, kind: NoticeKind, subject: str, detail: str | None = None) -> None:
        """Tell FALHOOK_NOTIFY_URL of an event (batched); nothing when it is not set."""
        if self._notifier is not None:
            self._notifier.notify(kind, subject, detail)

    async def _start_sampler(self, parts: contextlib.AsyncExitStack, store: Store) -> None:
        """The console's charts: once a minute, this process's numbers and the backlogs."""
        from falhook.receiver.console.charts import History, Sampler  # with the console only

        if self.history is None:
            self.history = History()

        def backlogs() -> dict[str, float]:
            counts = store.counts()
            found = {"pending": float(counts[State.PENDING] + counts[State.RUNNING])}
            if self._expectations is not None:
                waiting = self._expectations.counts()
                found["recovery"] = float(
                    waiting[ExpectationState.WAITING] + waiting[ExpectationState.POLLING]
                )
            if self.archiver is not None:
                media = self.archiver.rows.counts().states
                found["archive"] = float(media[MediaState.PENDING])
            return found

        sampler = Sampler(self.metrics, backlogs, self.history)

        async def every_minute() -> None:
            while True:
                await asyncio.sleep(60.0)  # a clock, not a wait for something
                try:
                    await asyncio.to_thread(sampler.sample)
                except ReceiverError as exc:  # the store is down: a gap in the chart
                    log.warning("console charts: no sample this minute: %s", exc)

        task = asyncio.create_task(every_minute(), name="falhook-charts")
        parts.push_async_callback(_cancel, task)

    def _new_dispatcher(self, store: Store) -> Dispatcher | None:
        """The dispatcher (None without callbacks), paused until the store's switch is read:
        a replica starting while dispatch is paused must not claim a batch first."""
        if not len(self.registry) and self.archiver is None:
            return None
        settings = self.settings
        dispatcher = Dispatcher(
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
            observer=MetricsObserver(self.metrics, self.trimmer, notify=self.notify),
            prepare=self.recovery.prepare if self.recovery is not None else None,
            archive=self.archiver,
            tracing=self.tracing,
        )
        dispatcher.pause()
        return dispatcher

    def _start_archive(self, store: Store) -> Archiver:
        """The archiver, its metrics on (only with FALHOOK_ARCHIVE_URL: httpx's and
        obstore's imports are paid only then)."""
        from falhook.receiver.archive import Archiver, MediaRows

        if not hasattr(self.metrics, "media_files"):  # once, however often it starts
            self.metrics.enable_archive(self._media_counts)
        archiver = Archiver(
            self.settings,
            MediaRows(store.engine),
            observe=self.metrics.media_file,
            on_failed=lambda url, error: self.notify(NoticeKind.MEDIA_FAILED, url, error),
        )
        archiver.tracing = self.tracing  # each download a CLIENT span, with tracing on
        return archiver

    async def _stop_archive(self) -> None:
        archiver, self.archiver = self.archiver, None
        if archiver is not None:
            await archiver.aclose()

    def _media_counts(self) -> Any:
        if self.archiver is None:
            raise NotStartedError()
        return self.archiver.rows.counts()

    async def _drain(self, dispatcher: Dispatcher) -> None:
        self._drained = await dispatcher.stop()

    def _refuse_deliveries(self) -> None:
        # From here on a delivery is answered 503 receiver_not_started: fal retries it.
        self.app.endpoint.intake = None

    def _forget_parts(self) -> None:
        self._store = self._keys = self._dispatcher = None
        self._pause = None
        self._expectations = None

    def _trace(self, tracing: Tracing | None) -> None:
        """Record spans with `tracing` (None: off) wherever they start."""
        self.tracing = self.app.endpoint.tracing = tracing
        if self._forwarder is not None:
            self._forwarder.tracing = tracing
        if self.recovery is not None:
            self.recovery.trace(tracing)
        if self.archiver is not None:
            self.archiver.tracing = tracing

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
            "forward_to": self._forwarder.shown if self._forwarder is not None else None,
            "forward_signed": self._forwarder is not None and self._forwarder.signed,
            "concurrency": settings.concurrency,
            "recovery": settings.queue_url if self.recovery is not None else None,
            "archive": settings.archive_url,
            "console": console,
            "tracing": self.tracing is not None,
        }
        targets = list(fields["callbacks"])
        if settings.forward_to:
            signed = "signed" if fields["forward_signed"] else "unsigned"
            targets.append(f"forwarding to {fields['forward_to']} ({signed})")
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

    async def stop(self) -> None:
        """Stop claiming, let running callbacks finish (up to the timeout), close the store:
        every part started, in reverse."""
        if self._starts == 0:
            return
        self._starts -= 1
        if self._starts > 0:
            return
        running, self._running = self._running, None
        self._drained = Drained(0, 0)
        if running is not None:
            await running.aclose()
        log.info(
            "falhook stopped after %.0f s: %d deliveries in flight finished, %d cancelled "
            "(retaken when their leases expire); the store's queued writes were committed",
            time.monotonic() - self._started_at,
            self._drained.finished,
            self._drained.cancelled,
            extra={"finished": self._drained.finished, "cancelled": self._drained.cancelled},
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
    # hooks.submit(...) is hooks.recovery.submit(...), and so on: the one implementation is
    # Recovery's (RecoveryDisabledError without a fal key).

    submit = _RecoveryMethod(Recovery.submit)
    submit_sync = _RecoveryMethod(Recovery.submit_sync)
    expect = _RecoveryMethod(Recovery.expect)
    expect_sync = _RecoveryMethod(Recovery.expect_sync)

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
        router.default = NotFound(self.metrics)
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


async def _warm_keys(keys: KeySource) -> None:
    try:
        await keys.ready()
    except KeysUnavailableError as exc:
        log.warning(
            "keys unavailable at start (deliveries are answered 503 until they load; "
            "fetched again as deliveries arrive): %s",
            exc,
        )


async def _cancel(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _to_console(request: Request) -> Response:
    return RedirectResponse(request.url.path + "/", status_code=308)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(
        {"error": error, "detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
    )


def create_app(
    settings: Settings | None = None,
    *,
    callbacks: Iterable[Callback] = (),
    tracer_provider: Any = None,
) -> ReceiverApp:
    """Build a receiver and return its ASGI app (the receiver is ``app.state.falhook``)."""
    return WebhookReceiver(settings, callbacks=callbacks, tracer_provider=tracer_provider).app
