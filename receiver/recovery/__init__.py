"""Recovery from fal's queue: submit, expect, and fetch what no webhook brought.

Modules: urls (fal's queue URLs, owner/app as fal-js parseEndpointId), expect (an
expectation validated and recorded: no httpx), client (the queue's REST
calls, httpx), transitions (what fal's answers mean, pure), poller (the loop the receiver's
lifespan runs), service (`Recovery`: what ``hooks.submit``/``hooks.expect`` call, and the
payload_error fetch).

The names below are loaded on first use (PEP 562): ``falhook expect`` imports expect.py,
which must not pull in httpx or the store's SQLAlchemy through this package's ``__init__``.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from falhook.receiver.lazy import lazy_exports as _lazy_exports

if _TYPE_CHECKING:
    from falhook.receiver.recovery.client import QueueAnswer, QueueClient
    from falhook.receiver.recovery.service import Recovery
    from falhook.receiver.recovery.urls import EndpointId, parse_endpoint_id, request_urls

# Public name -> the module that defines it.
_EXPORTS = {
    "EndpointId": "urls",
    "QueueAnswer": "client",
    "QueueClient": "client",
    "Recovery": "service",
    "parse_endpoint_id": "urls",
    "request_urls": "urls",
}

__all__ = [
    "EndpointId",
    "QueueAnswer",
    "QueueClient",
    "Recovery",
    "parse_endpoint_id",
    "request_urls",
]


__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals())
