"""Forwarder (sidecar mode): the raw body verbatim, the request id in a header, and any
non-2xx answer or connection error a failure the dispatcher retries."""

from __future__ import annotations

import asyncio
import base64
import time

import httpx
import pytest
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

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


SECRET = "whsec_" + base64.b64encode(bytes(range(24))).decode()


def _recorder(seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    return httpx.MockTransport(handle)


def _signed_requests(attempts: int) -> list[httpx.Request]:
    seen: list[httpx.Request] = []

    async def main() -> None:
        forwarder = Forwarder(
            "http://app.test/in", secret=SECRET, client=httpx.AsyncClient(transport=_recorder(seen))
        )
        try:
            for attempt in range(1, attempts + 1):
                delivery = Delivery.from_body(
                    BODY,
                    attempt=attempt,
                    received_at=time.time(),
                    user_id="user-9",
                    signed_at=1_764_580_000,
                )
                await forwarder(delivery)
        finally:
            await forwarder.aclose()

    asyncio.run(main())
    return seen


def test_a_signed_forward_verifies_with_standardwebhooks() -> None:
    first, second = _signed_requests(2)
    for request in (first, second):
        headers = dict(request.headers)
        # The library's own verify: what any Standard Webhooks receiver runs.
        assert Webhook(SECRET).verify(request.content, headers, json_parse=False) is None
        assert headers["x-fal-webhook-request-id"] == "fw-1"
        assert headers["x-fal-webhook-user-id"] == "user-9"
        assert headers["x-fal-webhook-timestamp"] == "1764580000"
    # Stable across retries: the app can deduplicate by webhook-id.
    assert first.headers["webhook-id"] == second.headers["webhook-id"] == "fw-1"
    tampered = first.content.replace(b"17454220438242315174", b"17454220438242315175")
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(tampered, dict(first.headers))
    with pytest.raises(WebhookVerificationError):
        Webhook("whsec_" + base64.b64encode(b"\x00" * 24).decode()).verify(
            first.content, dict(first.headers)
        )


def test_unsigned_without_a_secret() -> None:
    seen: list[httpx.Request] = []
    _run(_recorder(seen))
    assert "webhook-signature" not in seen[0].headers


@pytest.mark.parametrize(
    "secret", ["whsec_", "whsec_!!!notbase64", "whsec_" + base64.b64encode(b"short").decode()]
)
def test_a_bad_forward_secret_is_refused_naming_the_variable(secret: str) -> None:
    from falhook.receiver.errors import SettingsError
    from falhook.receiver.settings import Settings

    with pytest.raises(SettingsError) as info:
        Settings.from_env({"FALHOOK_FORWARD_SECRET": secret + " "})
    message = str(info.value)
    assert message.startswith("FALHOOK_FORWARD_SECRET=…:") and "16 random bytes" in message
