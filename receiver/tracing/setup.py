"""``falhook serve``'s tracer provider, from the standard ``OTEL_*`` variables.

Tracing is on when an exporter is asked for: ``OTEL_TRACES_EXPORTER`` (``otlp``,
``console``, or any exporter installed under its entry-point name), or an OTLP endpoint
(``OTEL_EXPORTER_OTLP_ENDPOINT``/``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), which means
``otlp``; never with ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none``. The rest
is the SDK's own reading of the variables: the service name and resource
(``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``; ``falhook`` when unnamed), the
sampler (``OTEL_TRACES_SAMPLER``), the batching (``OTEL_BSP_*``), the exporter's endpoint,
headers and timeout. ``otlp`` is OTLP over HTTP (protobuf), the exporter the extra installs.

A provider already set up in the process (``opentelemetry-instrument falhook serve``) is
used as it is.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from importlib.metadata import entry_points
from typing import Any

from falhook.receiver.errors import SettingsError

__all__ = ["provider_from_environ", "wanted"]

log = logging.getLogger("falhook.receiver")
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_PROTOCOLS = {"http/protobuf": "otlp_proto_http", "grpc": "otlp_proto_grpc"}


def wanted(environ: Mapping[str, str]) -> list[str]:
    """The exporters the variables ask for ([] : tracing off)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names and any(environ.get(name, "").strip() for name in _ENDPOINTS):
        names = ["otlp"]
    return [] if names == ["none"] else [n for n in names if n != "none"]


def provider_from_environ(environ: Mapping[str, str]) -> Any:
    """A started ``TracerProvider`` (also made the global one, if none was), or None.

    :raises SettingsError: an exporter that is not installed, or an unknown protocol.
    """
    names = wanted(environ)
    if not names:
        return None
    if importlib.util.find_spec("opentelemetry.sdk") is None:
        log.warning(
            "OTEL_TRACES_EXPORTER/OTEL_EXPORTER_OTLP_ENDPOINT is set, but OpenTelemetry is "
            "not installed: no traces (pip install 'falhook[otel]')"
        )
        return None
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current  # set up already (opentelemetry-instrument): used as it is
    exporters = [_exporter(name, environ) for name in names]
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "falhook"}))
    provider = TracerProvider(resource=resource)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    # Callbacks' own spans (trace.get_tracer(...)) join the same traces.
    trace.set_tracer_provider(provider)
    return provider


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    if name == "otlp":
        protocol = (
            environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
            or "http/protobuf"
        ).strip()
        if protocol not in _PROTOCOLS:
            raise SettingsError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: falhook exports OTLP as "
                "http/protobuf (or grpc, with opentelemetry-exporter-otlp-proto-grpc)"
            )
        name = _PROTOCOLS[protocol]
    found = entry_points(group="opentelemetry_traces_exporter", name=name)
    if not found:
        raise SettingsError(
            f"OTEL_TRACES_EXPORTER: no span exporter named {name!r} is installed"
            + (" (pip install opentelemetry-exporter-otlp-proto-grpc)" if "grpc" in name else "")
        )
    return next(iter(found)).load()()
