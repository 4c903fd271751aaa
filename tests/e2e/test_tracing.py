"""A real `falhook serve` exporting its spans as OTLP/HTTP (protobuf) to a loopback
collector the test runs, set up by the standard OTEL_* variables alone."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

pytest.importorskip("opentelemetry.sdk", reason="needs the falhook[otel] extra")

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.e2e.conftest import SpawnServer
from tests.e2e.server import Sender

pytestmark = pytest.mark.slow
GRACEFUL_EXIT = (0, -signal.SIGTERM)  # uvicorn re-raises the SIGTERM it handled


class Collector:
    """A loopback OTLP/HTTP trace endpoint: keeps every span it is sent, with the
    resource's attributes."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.resources: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self._lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                with collector._lock:
                    collector.paths.append(self.path)
                    for resource_spans in request.resource_spans:
                        collector.resources.append(
                            {
                                a.key: a.value.string_value
                                for a in resource_spans.resource.attributes
                            }
                        )
                        for scope_spans in resource_spans.scope_spans:
                            collector.spans.extend(scope_spans.spans)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def named(self, name: str) -> list[Span]:
        with self._lock:
            return [s for s in self.spans if s.name == name]


@pytest.fixture
def collector() -> Iterator[Collector]:
    found = Collector()
    found.thread.start()
    yield found
    found.server.shutdown()
    found.server.server_close()


def _attributes(span: Span) -> dict[str, Any]:
    return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}


def test_serve_exports_the_delivery_trace_over_otlp_http(
    spawn: SpawnServer, sender: Sender, client: httpx.Client, collector: Collector
) -> None:
    server = spawn(
        env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url,
            "OTEL_SERVICE_NAME": "falhook-e2e",
            # Batched for a minute: what arrives was flushed when the server stopped.
            "OTEL_BSP_SCHEDULE_DELAY": "60000",
        }
    )
    response = sender.post(client, server.webhook_url, "otlp-1")
    assert response.status_code == 200
    server.wait_records(lambda rs: any(r["phase"] == "done" for r in rs))
    # Graceful: the spans still batched were exported before the process ended.
    assert server.terminate() in GRACEFUL_EXIT

    assert set(collector.paths) == {"/v1/traces"}
    assert {"service.name": "falhook-e2e"}.items() <= collector.resources[0].items()
    [request] = collector.named("POST /webhooks/fal")
    [stored] = collector.named("INSERT falhook_deliveries")
    [process] = collector.named("process /webhooks/fal")
    assert request.kind == Span.SPAN_KIND_SERVER
    assert _attributes(request)["messaging.message.id"] == "otlp-1"
    assert _attributes(request)["falhook.verdict"] == "accepted"
    assert stored.parent_span_id == request.span_id
    assert process.kind == Span.SPAN_KIND_CONSUMER
    assert _attributes(process)["falhook.outcome"] == "done"
    [link] = process.links
    assert (link.trace_id, link.span_id) == (request.trace_id, request.span_id)
    assert '"tracing": true' in server.log()  # the startup line says so
