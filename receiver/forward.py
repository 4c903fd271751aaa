"""Sidecar mode: a built-in callback that POSTs each delivery to the user's app."""

from __future__ import annotations

import httpx

from falhook.receiver.errors import ForwardError
from falhook.receiver.models import Delivery

__all__ = ["ForwardError", "Forwarder"]


class Forwarder:
    """POST fal's body verbatim (it is JSON) to `url`, with the request id in a header.

    The body is forwarded byte for byte — re-serialising would change large integers and
    key order — so the app receives exactly what fal sent, already verified and deduped.
    Anything but a 2xx answer, and any connection error, is a failure to be retried.
    """

    def __init__(self, url: str, *, timeout: float = 30.0, client: httpx.AsyncClient | None = None):
        self.url = url
        self._client = client or httpx.AsyncClient(timeout=timeout, follow_redirects=False)

    async def __call__(self, delivery: Delivery) -> None:
        headers = {
            "content-type": "application/json",
            "x-falhook-request-id": delivery.request_id,
            "x-falhook-status": delivery.status,
            "x-falhook-attempt": str(delivery.attempt),
            "x-falhook-received-at": delivery.received_at.isoformat(),
        }
        try:
            response = await self._client.post(self.url, content=delivery.raw_body, headers=headers)
        except httpx.HTTPError as exc:
            raise ForwardError(f"POST {self.url} failed: {exc!r}") from exc
        if not response.is_success:
            raise ForwardError(f"POST {self.url} answered {response.status_code}")

    async def aclose(self) -> None:
        await self._client.aclose()
