"""Sidecar mode: a built-in callback that POSTs each delivery to the user's app.

With a secret (FALHOOK_FORWARD_SECRET), each request is signed with the Standard Webhooks
scheme (``webhook-id``, ``webhook-timestamp``, ``webhook-signature``), so the app behind
falhook verifies it with the `standardwebhooks` library in any language and can tell
falhook from anyone else who can reach it. The signing itself is that library's, not ours:
what the app checks is what we sign, by construction.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import httpx
from standardwebhooks import Webhook

from falhook.receiver.errors import ForwardError
from falhook.receiver.models import Delivery
from falhook.receiver.redact import shown_url, shown_urls_in

if TYPE_CHECKING:
    from falhook.receiver.tracing.spans import Tracing

__all__ = ["MAX_ANSWER_BYTES", "ForwardError", "Forwarder"]

# The most of an answer's body read: its status is what counts. A small answer is read
# whole (the connection is kept for the next forward); a bigger one is cut off and its
# connection closed, so a target answering a gigabyte costs a few kilobytes.
MAX_ANSWER_BYTES = 64 * 1024


class Forwarder:
    """POST fal's body verbatim (it is JSON) to `url`, with fal's ids in headers.

    The body is forwarded byte for byte — re-serialising would change large integers and
    key order — so the app receives exactly what fal sent, already verified and deduped.
    Anything but a 2xx answer, and any connection error, is a failure to be retried.
    Of the answer's body at most `MAX_ANSWER_BYTES` are read.

    The URL may carry credentials (``https://user:password@…``, ``?api_key=…``): they are
    sent, and `shown` — the URL with them masked — is what errors and names use.

    ``webhook-id`` is the delivery's request_id: the same on every retry, so the app can
    deduplicate by it, as Standard Webhooks intends; ``webhook-timestamp`` is the time of
    this attempt (the app's 5-minute tolerance applies to each attempt, not to fal's).
    """

    def __init__(
        self,
        url: str,
        *,
        secret: str | None = None,
        timeout: float = 30.0,
        client: httpx.AsyncClient | None = None,
    ):
        self.url = url
        self.shown = shown_url(url)
        self._signer = Webhook(secret) if secret else None
        self._timeout = timeout
        # Opened on first use, closed by `aclose` (the receiver's stop): a later start opens
        # a new one.
        self._client = client
        # Set when the receiver starts with tracing on: each POST is a CLIENT span, and the
        # app gets its `traceparent`, so it continues the trace.
        self.tracing: Tracing | None = None

    @property
    def signed(self) -> bool:
        return self._signer is not None

    async def __call__(self, delivery: Delivery) -> None:
        headers = {
            "content-type": "application/json",
            "x-falhook-request-id": delivery.request_id,
            "x-falhook-status": delivery.status,
            "x-falhook-attempt": str(delivery.attempt),
            "x-falhook-received-at": delivery.received_at.isoformat(),
            # What fal signed, for the app: falhook verified these before storing the body.
            "x-fal-webhook-request-id": delivery.request_id,
        }
        if delivery.user_id:
            headers["x-fal-webhook-user-id"] = delivery.user_id
        if delivery.signed_at is not None:
            headers["x-fal-webhook-timestamp"] = str(delivery.signed_at)
        if self._signer is not None:
            headers.update(self._signature(delivery))
        if self.tracing is None:
            status = await self._post(delivery, headers)
        else:
            with self.tracing.calling("POST", self.url, headers) as call:
                status = await self._post(delivery, headers)
                call.answered(status)
        if not 200 <= status < 300:
            raise ForwardError(f"POST {self.shown} answered {status}")

    async def _post(self, delivery: Delivery, headers: dict[str, str]) -> int:
        try:
            request = self._http().stream(
                "POST", self.url, content=delivery.raw_body, headers=headers
            )
            async with request as response:
                # Raw bytes (nothing decompressed: no gzip bomb), only up to the cap; leaving
                # the block before the end closes the connection instead of draining it.
                # (An answer already in memory, as a test transport's, has nothing to read.)
                if not response.is_stream_consumed:
                    read = 0
                    async for chunk in response.aiter_raw():
                        read += len(chunk)
                        if read > MAX_ANSWER_BYTES:
                            break
        except httpx.HTTPError as exc:
            # Not chained: the error and its traceback are stored and shown, and an httpx
            # error's text may hold the URL as given.
            detail = shown_urls_in(str(exc)) or "no detail"
            raise ForwardError(
                f"POST {self.shown} failed: {type(exc).__name__}: {detail}"
            ) from None
        return response.status_code

    def _signature(self, delivery: Delivery) -> dict[str, str]:
        assert self._signer is not None
        now = int(time.time())  # whole seconds: the header and the signed text must agree
        # The body is JSON (UTF-8, checked when it was received), so decoding is exact.
        signature = self._signer.sign(
            delivery.request_id, datetime.fromtimestamp(now, UTC), delivery.raw_body.decode()
        )
        return {
            "webhook-id": delivery.request_id,
            "webhook-timestamp": str(now),
            "webhook-signature": signature,
        }

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout, follow_redirects=False)
        return self._client

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()
