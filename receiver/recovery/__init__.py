"""Recovery from fal's queue: submit, expect, and fetch what no webhook brought.

Modules: urls (fal's queue URLs, owner/app as fal-js parseEndpointId), client (the queue's
REST calls, httpx), transitions (what fal's answers mean, pure), poller (the loop the
receiver's lifespan runs), service (`Recovery`: what ``hooks.submit``/``hooks.expect``
call, and the payload_error fetch).
"""

from falhook.receiver.recovery.client import QueueAnswer, QueueClient
from falhook.receiver.recovery.service import Recovery
from falhook.receiver.recovery.urls import EndpointId, parse_endpoint_id, request_urls

__all__ = [
    "EndpointId",
    "QueueAnswer",
    "QueueClient",
    "Recovery",
    "parse_endpoint_id",
    "request_urls",
]
