"""OpenTelemetry spans (receiver/tracing/), read back with the SDK's in-memory exporter:
the request, its commit and its processing linked to it; a retry; a recovered delivery
linked to its submit; a host's own provider; nothing at all when tracing is off."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("opentelemetry.sdk", reason="needs the falhook[otel] extra")

from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.testclient import TestClient

from falhook.receiver import Delivery, Settings, WebhookReceiver
from falhook.receiver.errors import SettingsError
from falhook.receiver.forward import Forwarder, ForwardError
from falhook.receiver.store import Store
from falhook.receiver.store.expectations import Expectations, NewExpectation
from falhook.receiver.tracing import resolve
from falhook.receiver.tracing.setup import provider_from_environ, wanted
from falhook.receiver.tracing.spans import Tracing, parse_links
from tests.fakes.fal_queue import FakeFalQueue
from tests.receiver import store_fixtures
from tests.receiver.conftest import Signer
from tests.receiver.store_fixtures import delivery

store_url = store_fixtures.store_url
pg_schema_url = store_fixtures.pg_schema_url

KEY = "fal-test-key"
ENDPOINT = "fal-ai/flux/dev"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def _wait_spans(
    exporter: InMemorySpanExporter, name: str, count: int = 1, timeout: float = 10.0
) -> list[ReadableSpan]:
    deadline = time.monotonic() + timeout
    while True:
        found = [s for s in exporter.get_finished_spans() if s.name == name]
        if len(found) >= count:
            return found
        assert time.monotonic() < deadline, f"no {count} {name!r} spans: {_names(exporter)}"
        time.sleep(0.01)


def _names(exporter: InMemorySpanExporter) -> list[str]:
    return [s.name for s in exporter.get_finished_spans()]


def _one(exporter: InMemorySpanExporter, name: str) -> ReadableSpan:
    [span] = _wait_spans(exporter, name)
    return span


def _span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    span_id: int = span.context.span_id
    return span_id


def _all_values(exporter: InMemorySpanExporter) -> str:
    """Every attribute and event value recorded, as one string."""
    values = []
    for span in exporter.get_finished_spans():
        values += [str(v) for v in (span.attributes or {}).values()]
        for event in span.events:
            values += [str(v) for v in (event.attributes or {}).values()]
    return "\n".join(values)


def test_received_stored_processed(
    settings: Settings, signer: Signer, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    hooks = WebhookReceiver(settings, tracer_provider=provider)

    @hooks.on_ok
    async def save(delivery: Delivery) -> None:
        with provider.get_tracer("user").start_as_current_span("user work"):
            pass

    @hooks.on_ok
    def save_in_a_thread(delivery: Delivery) -> None:  # a `def` callback: in a thread
        with provider.get_tracer("user").start_as_current_span("user work in a thread"):
            pass

    body, headers = signer("trace-1")
    headers = {name.lower(): value for name, value in headers.items()}
    with TestClient(hooks.app) as client:
        assert client.post("/webhooks/fal", content=body, headers=headers).status_code == 200
        process = _one(exporter, "process /webhooks/fal")
        assert client.post("/webhooks/fal", content=body, headers=headers).json()["duplicate"]
        signature = headers["x-fal-webhook-signature"]
        flipped = ("1" if signature[0] == "0" else "0") + signature[1:]
        forged = {**headers, "x-fal-webhook-signature": flipped}
        assert client.post("/webhooks/fal", content=body, headers=forged).status_code == 401
        _wait_spans(exporter, "POST /webhooks/fal", 3)

    first, duplicate, rejected = _wait_spans(exporter, "POST /webhooks/fal", 3)
    assert first.kind is SpanKind.SERVER
    assert first.attributes is not None
    assert first.attributes["messaging.system"] == "fal"
    assert first.attributes["messaging.operation.type"] == "receive"
    assert first.attributes["messaging.message.id"] == "trace-1"
    assert first.attributes["http.response.status_code"] == 200
    assert first.attributes["falhook.verdict"] == "accepted"
    assert first.attributes["falhook.duplicate"] is False
    assert duplicate.attributes is not None and duplicate.attributes["falhook.duplicate"] is True
    assert rejected.attributes is not None
    assert rejected.attributes["falhook.verdict"] == "rejected"
    assert rejected.attributes["falhook.rejection.reason"] == "invalid_signature"
    assert rejected.attributes["http.response.status_code"] == 401

    # The commit: a child of the request's span.
    stored = [s for s in exporter.get_finished_spans() if s.name == "INSERT falhook_deliveries"]
    assert stored[0].parent is not None and stored[0].parent.span_id == _span_id(first)
    assert stored[0].attributes is not None
    assert stored[0].attributes["db.system.name"] == "sqlite"

    # Its processing: a new trace, linked to the request; the callback's span inside it.
    assert process.kind is SpanKind.CONSUMER
    assert process.parent is None
    assert process.attributes is not None
    assert process.attributes["messaging.message.id"] == "trace-1"
    assert process.attributes["messaging.operation.type"] == "process"
    assert process.attributes["falhook.attempt"] == 1
    assert process.attributes["falhook.outcome"] == "done"
    [link] = process.links
    assert link.context.span_id == _span_id(first)
    assert link.context.trace_id == first.context.trace_id
    assert link.attributes == {"falhook.link": "received"}
    for name in ("user work", "user work in a thread"):
        user = _one(exporter, name)
        assert user.parent is not None and user.parent.span_id == _span_id(process)

    # The signature headers are never recorded.
    recorded = _all_values(exporter)
    for name in ("x-fal-webhook-signature", "x-fal-webhook-timestamp"):
        assert headers[name] not in recorded


def test_a_retry_is_a_second_process_span_linked_to_the_same_request(
    settings: Settings, signer: Signer, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    hooks = WebhookReceiver(settings, tracer_provider=provider)
    calls: list[int] = []

    @hooks.on_ok
    async def flaky(delivery: Delivery) -> None:
        calls.append(delivery.attempt)
        if delivery.attempt == 1:
            raise RuntimeError("downstream is down")

    body, headers = signer("trace-retry")
    with TestClient(hooks.app) as client:
        client.post("/webhooks/fal", content=body, headers=headers)
        first, second = _wait_spans(exporter, "process /webhooks/fal", 2)
    request = _one(exporter, "POST /webhooks/fal")
    assert first.attributes is not None and second.attributes is not None
    for span, attempt, outcome in ((first, 1, "retry"), (second, 2, "done")):
        assert span.attributes is not None
        assert span.attributes["falhook.attempt"] == attempt
        assert span.attributes["falhook.outcome"] == outcome
    assert first.status.status_code is StatusCode.ERROR
    assert first.attributes["error.type"] == "RuntimeError"
    [event] = [e for e in first.events if e.name == "exception"]
    assert event.attributes is not None
    assert "downstream is down" in str(event.attributes["exception.message"])
    assert second.status.status_code is StatusCode.UNSET and not second.events
    for span in (first, second):
        assert [link.context.span_id for link in span.links] == [_span_id(request)]


def test_a_recovered_delivery_links_to_its_submit_and_its_fetch(
    settings: Settings, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    with FakeFalQueue(api_key=KEY) as fake:
        fast = settings.replace(
            fal_key=KEY,
            queue_url=fake.url,
            public_url="https://hooks.example.com",
            recover_after_seconds=0.1,
            recover_poll_seconds=0.05,
            recover_grace_seconds=0.05,
        )
        hooks = WebhookReceiver(fast, tracer_provider=provider)
        seen = asyncio.Event()

        @hooks.on_delivery
        async def record(delivery: Delivery) -> None:
            seen.set()

        async def body() -> str:
            async with hooks:
                tracer = provider.get_tracer("caller")
                with tracer.start_as_current_span("caller's request"):
                    answer = await hooks.submit(ENDPOINT, {"prompt": "dog"})
                fake.complete(answer["request_id"])  # no webhook: recovered from the queue
                await asyncio.wait_for(seen.wait(), 10)
            return str(answer["request_id"])

        request_id = asyncio.run(body())
    caller = _one(exporter, "caller's request")
    submit = _one(exporter, f"submit {ENDPOINT}")
    assert submit.kind is SpanKind.PRODUCER
    assert submit.parent is not None and submit.parent.span_id == _span_id(caller)
    assert submit.attributes is not None
    assert submit.attributes["messaging.message.id"] == request_id
    assert submit.attributes["messaging.destination.name"] == ENDPOINT
    posts = [s for s in exporter.get_finished_spans() if s.name == "POST"]
    assert posts[0].kind is SpanKind.CLIENT
    assert posts[0].parent is not None and posts[0].parent.span_id == _span_id(submit)
    received = _one(exporter, f"receive {ENDPOINT}")
    gets = [s for s in exporter.get_finished_spans() if s.name == "GET"]
    assert any(g.parent is not None and g.parent.span_id == _span_id(received) for g in gets)
    for get in gets:  # every call to fal's queue is a CLIENT span; the key is never in it
        assert get.kind is SpanKind.CLIENT
        assert get.attributes is not None and get.attributes["http.response.status_code"] == 200
    assert KEY not in _all_values(exporter)
    process = _one(exporter, "process /webhooks/fal")
    assert process.attributes is not None and process.attributes["falhook.source"] == "queue"
    assert [(link.context.span_id, dict(link.attributes or {})) for link in process.links] == [
        (_span_id(received), {"falhook.link": "received"}),
        (_span_id(submit), {"falhook.link": "submitted"}),
    ]


def test_a_webhook_delivery_of_a_submitted_request_links_to_the_submit(
    settings: Settings, signer: Signer, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    with FakeFalQueue(api_key=KEY) as fake:
        hooks = WebhookReceiver(
            settings.replace(fal_key=KEY, queue_url=fake.url, recover_after_seconds=60),
            tracer_provider=provider,
        )

        @hooks.on_ok
        async def save(delivery: Delivery) -> None:
            pass

        with TestClient(hooks.app) as client:
            request_id = hooks.submit_sync(ENDPOINT, {"prompt": "cat"})["request_id"]
            body, headers = signer(request_id)
            assert client.post("/webhooks/fal", content=body, headers=headers).status_code == 200
            process = _one(exporter, "process /webhooks/fal")
    request = _one(exporter, "POST /webhooks/fal")
    submit = _one(exporter, f"submit {ENDPOINT}")
    assert [link.context.span_id for link in process.links] == [
        _span_id(request),
        _span_id(submit),
    ]


def test_a_mounted_receiver_uses_the_hosts_global_provider_and_never_replaces_it(
    settings: Settings,
    signer: Signer,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What trace.set_tracer_provider(provider) does, undone after the test.
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    hooks = WebhookReceiver(settings)

    @hooks.on_ok
    async def save(delivery: Delivery) -> None:
        pass

    host = FastAPI(lifespan=hooks.lifespan)

    @host.middleware("http")
    async def instrumented(request: Any, call_next: Any) -> Any:
        # Like a host's HTTP instrumentation: a SERVER span around every request.
        tracer = provider.get_tracer("host")
        with tracer.start_as_current_span("host request", kind=SpanKind.SERVER):
            return await call_next(request)

    host.mount("/fal", hooks.app)
    body, headers = signer("mounted-trace")
    with TestClient(host) as client:
        assert client.post("/fal/webhooks/fal", content=body, headers=headers).status_code == 200
        _one(exporter, "process /webhooks/fal")
        assert hooks.tracing is not None
    assert trace.get_tracer_provider() is provider
    host_span = _one(exporter, "host request")
    # One SERVER span per request: the host's; the receiver's is its child.
    receive = _one(exporter, "receive /webhooks/fal")
    assert receive.kind is SpanKind.INTERNAL
    assert receive.parent is not None and receive.parent.span_id == _span_id(host_span)
    assert "POST /webhooks/fal" not in _names(exporter)


def test_a_provider_passed_in_wins_over_the_global_one(
    settings: Settings,
    signer: Signer,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    other = InMemorySpanExporter()
    global_provider = TracerProvider(shutdown_on_exit=False)
    global_provider.add_span_processor(SimpleSpanProcessor(other))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", global_provider)
    hooks = WebhookReceiver(settings, tracer_provider=provider)
    body, headers = signer("passed-in")
    with TestClient(hooks.app) as client:
        client.post("/webhooks/fal", content=body, headers=headers)
    assert _names(exporter) == ["INSERT falhook_deliveries", "POST /webhooks/fal"]
    assert other.get_finished_spans() == ()


def test_nothing_is_recorded_or_stored_when_tracing_is_off(
    settings: Settings, signer: Signer, exporter: InMemorySpanExporter
) -> None:
    assert resolve() is None  # the API is imported here, but no provider was set up
    hooks = WebhookReceiver(settings)
    got: list[Delivery] = []

    @hooks.on_ok
    async def save(delivery: Delivery) -> None:
        got.append(delivery)

    body, headers = signer("untraced")
    with TestClient(hooks.app) as client:
        client.post("/webhooks/fal", content=body, headers=headers)
        assert hooks.tracing is None and hooks.app.endpoint.tracing is None
        deadline = time.monotonic() + 10
        while not got:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    path = settings.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT trace_context FROM falhook_deliveries").fetchall() == [(None,)]


def test_without_a_provider_nothing_of_opentelemetry_is_imported(
    settings: Settings, signer: Signer
) -> None:
    body, headers = signer("no-otel")
    script = f"""
import sys
from starlette.testclient import TestClient
from falhook.receiver import Settings, WebhookReceiver
settings = Settings(database_url={settings.database_url!r}, jwks_url={settings.jwks_url!r})
hooks = WebhookReceiver(settings)
with TestClient(hooks.app) as client:
    assert client.post("/webhooks/fal", content={body!r}, headers={headers!r}).status_code == 200
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
assert not loaded, loaded
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def test_forwards_carry_traceparent_of_their_client_span(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(503)

    async def main() -> None:
        forwarder = Forwarder(
            "http://user:secret@app.test/in?token=t0k",
            client=httpx.AsyncClient(transport=httpx.MockTransport(handle)),
        )
        tracing = Tracing.for_provider(provider)
        assert tracing is not None
        forwarder.tracing = tracing
        body = b'{"request_id": "fw-trace", "status": "OK", "payload": {}}'
        delivery = Delivery.from_body(body, attempt=1, received_at=time.time())
        with (
            tracing.processing("fw-trace", 1, "webhook", None),
            pytest.raises(ForwardError, match="503"),
        ):
            await forwarder(delivery)
        await forwarder.aclose()

    asyncio.run(main())
    post = _one(exporter, "POST")
    assert post.kind is SpanKind.CLIENT
    assert post.attributes is not None
    assert post.attributes["url.full"] == "http://app.test/in"  # no user info, no query
    assert post.attributes["http.response.status_code"] == 503
    assert post.status.status_code is StatusCode.ERROR
    assert post.context is not None
    [request] = seen
    assert request.headers["traceparent"].startswith(
        f"00-{post.context.trace_id:032x}-{post.context.span_id:016x}-"
    )


def test_stored_contexts_read_back_as_links() -> None:
    received = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    submitted = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    links = parse_links(f"{received} {submitted}")
    assert [(f"{link.context.span_id:016x}", link.attributes) for link in links] == [
        ("b7ad6b7169203331", {"falhook.link": "received"}),
        ("00f067aa0ba902b7", {"falhook.link": "submitted"}),
    ]
    assert parse_links(None) == [] and parse_links("garbage 00-zz-yy-01") == []


@pytest.mark.parametrize(
    ("environ", "exporters"),
    [
        ({}, []),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, []),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ["otlp", "console"]),
    ],
)
def test_which_exporters_the_variables_ask_for(
    environ: dict[str, str], exporters: list[str]
) -> None:
    assert wanted(environ) == exporters


def test_serve_refuses_an_exporter_it_does_not_have() -> None:
    with pytest.raises(SettingsError, match="no span exporter named 'zipkin'"):
        provider_from_environ({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(SettingsError, match="OTEL_EXPORTER_OTLP_PROTOCOL='http/json'"):
        provider_from_environ(
            {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}
        )
    assert provider_from_environ({}) is None


RECEIVED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
SUBMITTED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_the_store_keeps_where_a_delivery_was_received_and_submitted(store_url: str) -> None:
    async def body() -> None:
        store = Store(store_url)
        store.start()
        try:
            expectations = Expectations(store)
            for request_id in ("claimed", "pending"):
                new = NewExpectation(request_id, ENDPOINT, trace_context=SUBMITTED)
                await expectations.run(expectations.op_add(new, recover_after=60, ttl=600))
            traced = dataclasses.replace(delivery("claimed"), trace_context=RECEIVED)
            claim = await store.insert_claimed(traced, "claim-1", lease_seconds=30, parsed=None)
            assert claim is not None and claim.trace_context == f"{RECEIVED} {SUBMITTED}"
            traced = dataclasses.replace(delivery("pending"), trace_context=RECEIVED)
            assert await store.insert(traced)
            assert await store.insert(delivery("untraced"))  # tracing off: nothing looked up
            claims = {c.request_id: c for c in (await store.claim(10, 30)).claims}
            assert claims["pending"].trace_context == f"{RECEIVED} {SUBMITTED}"
            assert claims["untraced"].trace_context is None
        finally:
            await store.stop()

    asyncio.run(body())


def test_a_submit_before_the_receiver_starts_is_traced_too(
    settings: Settings, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    with FakeFalQueue(api_key=KEY) as fake:
        hooks = WebhookReceiver(
            settings.replace(fal_key=KEY, queue_url=fake.url), tracer_provider=provider
        )
        request_id = hooks.submit_sync(ENDPOINT, {"prompt": "cat"})["request_id"]
    submit = _one(exporter, f"submit {ENDPOINT}")
    assert submit.attributes is not None
    assert submit.attributes["messaging.message.id"] == request_id
    path = settings.database_url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        [(stored,)] = db.execute("SELECT trace_context FROM falhook_expectations").fetchall()
    assert submit.context is not None
    assert stored.split("-")[2] == f"{submit.context.span_id:016x}"
