"""Forwarder (sidecar mode): the raw body verbatim, the request id in a header, and any
non-2xx answer or connection error a failure the dispatcher retries."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from falhook.receiver import Delivery
from falhook.receiver.forward import Forwarder, ForwardError

BODY = b'{"request_id": "fw-1",  "status": "OK", "payload": {"seed": 17454220438242315174}}'


def _delivery() -> Delivery:
    return Delivery.from_body(BODY, attempt=2, received_at=time.time())


def _run(handler: httpx.MockTransport) -> None:
    async def main() -> None:
        forwarder = Forwarder("http://app.test/in", client=httpx.AsyncClient(transport=handler))
        try:
            await forwarder(_delivery())
        finally:
            await forwarder.aclose()

    asyncio.run(main())


def test_posts_the_raw_body_with_headers() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    _run(httpx.MockTransport(handle))
    [request] = seen
    assert request.method == "POST"
    assert str(request.url) == "http://app.test/in"
    assert request.content == BODY
    assert request.headers["x-falhook-request-id"] == "fw-1"
    assert request.headers["x-falhook-status"] == "OK"
    assert request.headers["x-falhook-attempt"] == "2"
    assert request.headers["content-type"] == "application/json"


@pytest.mark.parametrize("status", [300, 307, 400, 404, 500, 503])
def test_non_2xx_is_a_failure(status: int) -> None:
    with pytest.raises(ForwardError, match=str(status)):
        _run(httpx.MockTransport(lambda request: httpx.Response(status)))


def test_connection_error_is_a_failure() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    with pytest.raises(ForwardError, match="refused"):
        _run(httpx.MockTransport(refuse))
