"""OpenTelemetry tracing, when the ``falhook[otel]`` extra is installed and set up.

`resolve` decides once, at start, whether spans are recorded: with the tracer provider
the receiver was given, else with the process's global one — only if someone set one up
(the host application, ``opentelemetry-instrument``, or ``falhook serve`` from the
``OTEL_*`` variables). Otherwise it returns None and every call site skips tracing with
one ``is None`` test: nothing of OpenTelemetry is imported, nothing slows down.

spans.py records the spans (imports OpenTelemetry); setup.py builds ``falhook serve``'s
provider from the standard ``OTEL_*`` variables.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from falhook.receiver.tracing.spans import Tracing

__all__ = ["resolve"]


def resolve(provider: Any = None) -> Tracing | None:
    """The spans to record with `provider` (a ``TracerProvider``), or with the global
    provider when None; None when tracing is off."""
    if provider is None and "opentelemetry.trace" not in sys.modules:
        return None  # nobody set OpenTelemetry up in this process: import nothing
    try:
        from falhook.receiver.tracing.spans import Tracing
    except ImportError:  # the extra is not installed (a host passed a provider anyway)
        return None
    return Tracing.for_provider(provider)
