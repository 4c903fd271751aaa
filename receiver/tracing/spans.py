"""The spans falhook records, following OpenTelemetry's messaging conventions.

A delivery's life, as spans (README "Tracing")::

    POST /webhooks/fal (SERVER)        the webhook request: verdict, duplicate, reason
      INSERT falhook_deliveries        its commit
    process /webhooks/fal (CONSUMER)   each attempt of its callbacks, later; linked to
      POST (CLIENT)                    the request (and to the submit), a forward
    submit <endpoint> (PRODUCER)       hooks.submit, in the caller's trace
      POST (CLIENT)                    the call to fal's queue
    receive <endpoint> (CLIENT)        a result recovered from fal's queue
      GET (CLIENT)                     the call

A span's context travels through the store as a W3C ``traceparent`` string (the
``trace_context`` columns), so an attempt on another replica, after a restart, links to
the request it came in and to the submit that asked for it. Signature headers, bodies and
the fal key are never recorded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, MutableMapping
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags

from falhook import __version__
from falhook.receiver.settings import WEBHOOK_PATH

__all__ = ["SYSTEM", "Receiving", "Tracing", "parse_links", "traceparent"]

SYSTEM = "fal"  # messaging.system: fal's queue and its webhooks
DESTINATION = WEBHOOK_PATH  # where fal sends deliveries: their destination
_PROCESS = f"process {DESTINATION}"
_RECEIVE = f"receive {DESTINATION}"
_SERVER = f"POST {DESTINATION}"


def traceparent(span: trace.Span) -> str | None:
    """A sampled span's context as a W3C traceparent, to store; None otherwise (nothing
    would show a link to a span that was not recorded)."""
    ctx = span.get_span_context()
    if not ctx.is_valid or not ctx.trace_flags.sampled:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _span_context(text: str) -> SpanContext | None:
    parts = text.split("-")
    if len(parts) != 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    ctx = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))
    return ctx if ctx.is_valid else None


# What each stored context is, in the order the store keeps them: the request a delivery
# came in (the webhook's, or the recovery's), then the submit that asked for it.
_LINK_KINDS = ("received", "submitted")


def parse_links(stored: str | None) -> list[Link]:
    """The links a stored ``trace_context`` stands for (unreadable parts are skipped)."""
    if not stored:
        return []
    links = []
    for i, text in enumerate(stored.split()[: len(_LINK_KINDS)]):
        ctx = _span_context(text)
        if ctx is not None:
            links.append(Link(ctx, {"falhook.link": _LINK_KINDS[i]}))
    return links


def _messaging(operation: str, kind: str, destination: str, **more: Any) -> dict[str, Any]:
    return {
        "messaging.system": SYSTEM,
        "messaging.operation.name": operation,
        "messaging.operation.type": kind,
        "messaging.destination.name": destination,
        **more,
    }


def _url_without_secrets(url: str) -> str:
    """A URL as recorded: no user info, no query (either may hold a secret)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url.split("?", 1)[0]
    authority, slash, path = rest.partition("/")
    host = authority.rpartition("@")[2]
    return f"{scheme}://{host}{slash}{path.split('?', 1)[0].split('#', 1)[0]}"


def _failed(span: trace.Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_attribute("error.type", type(exc).__qualname__)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"[:300]))


class Receiving:
    """The span of one webhook request, current while it is handled."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: trace.Span) -> None:
        self._span = span
        self._token = otel_context.attach(trace.set_span_in_context(span))

    def answered(
        self,
        status: int,
        *,
        request_id: str | None = None,
        duplicate: bool | None = None,
        reason: str | None = None,
    ) -> None:
        span = self._span
        if not span.is_recording():  # not sampled
            return
        # One call: the SDK checks and copies each attribute under a lock, per call.
        attributes: dict[str, Any] = {"http.response.status_code": status}
        if request_id is not None:
            attributes["messaging.message.id"] = request_id
        if duplicate is not None:
            attributes["falhook.verdict"] = "duplicate" if duplicate else "accepted"
            attributes["falhook.duplicate"] = duplicate
        else:
            attributes["falhook.verdict"] = "rejected"
            attributes["falhook.rejection.reason"] = reason or "unknown"
            if status >= 500:
                attributes["error.type"] = reason or str(status)
                span.set_status(Status(StatusCode.ERROR, reason))
        span.set_attributes(attributes)

    def end(self) -> None:
        otel_context.detach(self._token)
        self._span.end()


class Tracing:
    """Starts falhook's spans on one tracer (see the module's docstring)."""

    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer

    @classmethod
    def for_provider(cls, provider: trace.TracerProvider | None) -> Tracing | None:
        if provider is None:
            provider = trace.get_tracer_provider()
            if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
                return None  # the API is there, but nobody set a provider up
        tracer = provider.get_tracer("falhook", __version__)
        if isinstance(tracer, trace.NoOpTracer):  # e.g. OTEL_SDK_DISABLED=true
            return None
        return cls(tracer)

    # -- the webhook request -----------------------------------------------------------

    def receiving(self, scope: MutableMapping[str, Any], started: float) -> Receiving:
        """The request's span, from its arrival (`started`, on the perf_counter clock).

        A SERVER span of its own; or, mounted in a host whose HTTP instrumentation already
        made one, a child of the host's (one SERVER span per request)."""
        host = trace.get_current_span()
        nested = host.get_span_context().is_valid and not host.get_span_context().is_remote
        parent = None
        if not nested and any(name == b"traceparent" for name, _ in scope["headers"]):
            # A traced proxy in front: continue its trace (fal itself sends no context).
            carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            parent = propagate.extract(carrier)
        start = time.time_ns() - int((time.perf_counter() - started) * 1e9)
        attributes = _messaging(
            "receive",
            "receive",
            DESTINATION,
            **{"http.request.method": scope.get("method", ""), "http.route": DESTINATION},
        )
        if not nested:
            attributes["url.path"] = scope.get("path", "")
            client = scope.get("client")
            if client:
                attributes["client.address"] = str(client[0])
        span = self.tracer.start_span(
            _RECEIVE if nested else _SERVER,
            context=parent,
            kind=SpanKind.INTERNAL if nested else SpanKind.SERVER,
            attributes=attributes,
            start_time=start,
        )
        return Receiving(span)

    @staticmethod
    def current_context() -> str | None:
        """The current span's context, to store with a delivery received in it."""
        return traceparent(trace.get_current_span())

    @contextlib.contextmanager
    def storing(self, dialect: str) -> Iterator[trace.Span]:
        """The commit of a delivery (a child of the request's span)."""
        with self.tracer.start_as_current_span(
            "INSERT falhook_deliveries",
            kind=SpanKind.CLIENT,
            attributes={
                "db.system.name": dialect,
                "db.operation.name": "INSERT",
                "db.collection.name": "falhook_deliveries",
            },
        ) as span:
            yield span

    # -- dispatch ----------------------------------------------------------------------

    @contextlib.contextmanager
    def processing(
        self, request_id: str, attempt: int, source: str, stored: str | None
    ) -> Iterator[trace.Span]:
        """One attempt of a delivery's callbacks: a new trace, linked to the request it
        came in and to its submit (`stored`: the delivery's ``trace_context``); current
        while the callbacks run, so theirs are its children."""
        with self.tracer.start_as_current_span(
            _PROCESS,
            context=otel_context.Context(),  # a root: it runs long after the request
            kind=SpanKind.CONSUMER,
            links=parse_links(stored),
            attributes=_messaging(
                "process",
                "process",
                DESTINATION,
                **{
                    "messaging.message.id": request_id,
                    "falhook.attempt": attempt,
                    "falhook.source": source,
                },
            ),
            record_exception=False,  # recorded by `failed`, with the callback's own
            set_status_on_exception=False,
        ) as span:
            yield span

    @staticmethod
    def failed(exc: BaseException) -> None:
        """Record a failure (a callback's exception) on the current span."""
        _failed(trace.get_current_span(), exc)

    @staticmethod
    def settled(span: trace.Span, outcome: str) -> None:
        span.set_attribute("falhook.outcome", outcome)
        if outcome == "unrecorded":
            span.set_status(Status(StatusCode.ERROR, "the outcome could not be recorded"))

    # -- calls out ---------------------------------------------------------------------

    @contextlib.contextmanager
    def calling(
        self, method: str, url: str, headers: MutableMapping[str, str] | None = None
    ) -> Iterator[Call]:
        """An HTTP call (a forward, fal's queue): a CLIENT span; with `headers`, the
        trace context is written in them, so the server continues the trace."""
        parsed = _url_without_secrets(url)
        host = parsed.partition("://")[2].split("/", 1)[0]
        with self.tracer.start_as_current_span(
            method,
            kind=SpanKind.CLIENT,
            attributes={
                "http.request.method": method,
                "url.full": parsed,
                "server.address": host.rsplit(":", 1)[0] if ":" in host else host,
            },
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            if headers is not None:
                propagate.inject(headers)
            call = Call(span)
            try:
                yield call
            except BaseException as exc:
                _failed(span, exc)
                raise

    @contextlib.contextmanager
    def submitting(self, endpoint_id: str) -> Iterator[Submission]:
        """``hooks.submit``: a PRODUCER span in the caller's current trace."""
        with self.tracer.start_as_current_span(
            f"submit {endpoint_id}",
            kind=SpanKind.PRODUCER,
            attributes=_messaging("submit", "send", endpoint_id),
        ) as span:
            yield Submission(span)

    @contextlib.contextmanager
    def recovering(self, request_id: str, endpoint_id: str) -> Iterator[Submission]:
        """Fetching a result from fal's queue: a message received (a new trace)."""
        with self.tracer.start_as_current_span(
            f"receive {endpoint_id}",
            context=otel_context.Context(),
            kind=SpanKind.CLIENT,
            attributes=_messaging(
                "receive", "receive", endpoint_id, **{"messaging.message.id": request_id}
            ),
        ) as span:
            yield Submission(span)


class Call:
    """An HTTP call's span: its answer."""

    __slots__ = ("span",)

    def __init__(self, span: trace.Span) -> None:
        self.span = span

    def answered(self, status: int) -> None:
        self.span.set_attribute("http.response.status_code", status)
        if status >= 400:
            self.span.set_attribute("error.type", str(status))
            self.span.set_status(Status(StatusCode.ERROR))


class Submission:
    """A message's span (a submit, a recovery): its id, and its context to store."""

    __slots__ = ("span",)

    def __init__(self, span: trace.Span) -> None:
        self.span = span

    def message(self, request_id: str) -> None:
        self.span.set_attribute("messaging.message.id", request_id)

    @property
    def context(self) -> str | None:
        return traceparent(self.span)
