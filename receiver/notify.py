"""Told before asked: one POST when something breaks, batched per kind.

With FALHOOK_NOTIFY_URL set, falhook POSTs ``{"text": …}`` — the shape Slack's and
Discord's incoming webhooks accept — when a delivery goes dead, an expectation fails or
expires, or an archived file fails. The first event of a kind is sent at once; what
follows within the next minute is gathered into one message with a count, so a burst of
a thousand dead deliveries is one message, not a thousand.

Notifications are best-effort and never in anyone's way: `Notifier.notify` only appends to
a bounded batch on the event loop; a task of its own sends, retrying a failed POST with
backoff until the next batch of that kind is due. What a notification says is in the store
too (the dead delivery, the failed expectation), so one lost with the process loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote, urlencode

import httpx
from standardwebhooks import Webhook

from falhook.receiver.redact import shown_url

__all__ = ["NoticeKind", "Notifier"]

log = logging.getLogger("falhook.notify")

# Named in a message at most; the rest is a count. Bounds each batch's memory too.
_NAMED = 5


class NoticeKind(enum.StrEnum):
    """What a notification is about; one batch (and one rate limit) per kind."""

    DELIVERY_DEAD = "delivery_dead"
    EXPECTATION_FAILED = "expectation_failed"
    EXPECTATION_EXPIRED = "expectation_expired"
    MEDIA_FAILED = "media_failed"


_WHAT = {
    NoticeKind.DELIVERY_DEAD: ("delivery went dead", "deliveries went dead"),
    NoticeKind.EXPECTATION_FAILED: ("expected result failed", "expected results failed"),
    NoticeKind.EXPECTATION_EXPIRED: (
        "expected result expired without arriving",
        "expected results expired without arriving",
    ),
    NoticeKind.MEDIA_FAILED: ("file could not be archived", "files could not be archived"),
}


@dataclass
class _Batch:
    count: int = 0
    named: list[tuple[str, str | None]] = field(default_factory=list)

    def add(self, subject: str, detail: str | None) -> None:
        self.count += 1
        if len(self.named) < _NAMED:
            self.named.append((subject, detail))


@dataclass
class _Kind:
    pending: _Batch = field(default_factory=_Batch)
    # When the next message of this kind may go: the first event after a quiet minute
    # goes at once, later ones wait for this.
    next_at: float = 0.0


class Notifier:
    """Sends batched notifications of `NoticeKind` events to `url`.

    `notify` is for the event loop only and never blocks or raises. `run` is the sending
    task; `aclose` sends what is pending (bounded by `close_timeout`) and stops.
    """

    def __init__(
        self,
        url: str,
        *,
        secret: str | None = None,
        console_url: str | None = None,
        interval: float = 60.0,
        timeout: float = 10.0,
        close_timeout: float = 5.0,
        retry_delay: float = 1.0,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_sent: Callable[[NoticeKind, str], None] | None = None,
    ) -> None:
        self.url = url
        self.console_url = console_url.rstrip("/") if console_url else None
        self.interval = interval
        self._signer = Webhook(secret) if secret else None
        self._client = client or httpx.AsyncClient(timeout=timeout, follow_redirects=False)
        self._close_timeout = close_timeout
        self._retry_delay = retry_delay
        self._clock = clock
        self._on_sent = on_sent
        self._kinds = {kind: _Kind() for kind in NoticeKind}
        self._wake = asyncio.Event()
        self._closing = False

    def notify(self, kind: NoticeKind, subject: str, detail: str | None = None) -> None:
        """Note one event (a request id, a file's URL); sent with its kind's next batch."""
        self._kinds[kind].pending.add(subject, detail)
        self._wake.set()

    async def run(self) -> None:
        """Send batches as they fall due, until `aclose`."""
        while not self._closing:
            self._wake.clear()
            due = [k for k, s in self._kinds.items() if s.pending.count and self._due(s)]
            for kind in due:
                await self._send(kind)
            waits = [s.next_at - self._clock() for s in self._kinds.values() if s.pending.count]
            timeout = max(0.0, min(waits)) if waits else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _due(self, state: _Kind) -> bool:
        return self._clock() >= state.next_at

    async def _send(self, kind: NoticeKind) -> None:
        state = self._kinds[kind]
        batch, state.pending = state.pending, _Batch()
        state.next_at = self._clock() + self.interval
        body = json.dumps({"text": self.text(kind, batch)}).encode()
        delay = self._retry_delay
        while True:
            outcome = await self._post(body)
            if outcome == "sent" or self._closing:
                break
            # Retried until the next batch of this kind is due; then this one is given up
            # (counted) rather than let failures pile up behind a receiver that is down.
            if self._clock() + delay >= state.next_at:
                outcome = "dropped"
                break
            self._report(kind, "retried")
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.interval)
        self._report(kind, outcome)
        if outcome != "sent":
            log.warning(
                "could not notify %s of %d %s",
                shown_url(self.url),  # a notification URL may carry a token
                batch.count,
                kind.value.replace("_", " "),
            )

    async def _post(self, body: bytes) -> str:
        headers = {"content-type": "application/json"}
        if self._signer is not None:
            now = datetime.now(UTC).replace(microsecond=0)
            message_id = f"msg_{uuid.uuid4().hex}"
            headers["webhook-id"] = message_id
            headers["webhook-timestamp"] = str(int(now.timestamp()))
            headers["webhook-signature"] = self._signer.sign(message_id, now, body.decode())
        try:
            # Only the status counts: the answer's body is never read (leaving the block
            # unread closes the connection), however big the target makes it.
            async with self._client.stream(
                "POST", self.url, content=body, headers=headers
            ) as response:
                pass
        except httpx.HTTPError:
            return "failed"
        return "sent" if response.is_success else "failed"

    def _report(self, kind: NoticeKind, outcome: str) -> None:
        if self._on_sent is not None:
            self._on_sent(kind, outcome)

    def text(self, kind: NoticeKind, batch: _Batch) -> str:
        """The message for `batch`: what happened, how many, which, and where to look."""
        one, many = _WHAT[kind]
        what = one if batch.count == 1 else many
        lines = [f"falhook: {batch.count} {what}"]
        for subject, detail in batch.named:
            line = f"• {self._link(kind, subject)}"
            if detail:
                line += f": {_summary(detail)}"
            lines.append(line)
        if batch.count > len(batch.named):
            lines.append(f"… and {batch.count - len(batch.named)} more")
        if self.console_url is not None and kind is NoticeKind.DELIVERY_DEAD:
            lines.append(f"All dead deliveries: {self.console_url}/?{urlencode({'state': 'dead'})}")
        return "\n".join(lines)

    def _link(self, kind: NoticeKind, subject: str) -> str:
        if self.console_url is None or kind is NoticeKind.MEDIA_FAILED:
            return subject
        if kind is NoticeKind.DELIVERY_DEAD:
            return f"{subject} {self.console_url}/deliveries/{quote(subject, safe='')}"
        return subject

    async def aclose(self) -> None:
        """Send what is pending (within `close_timeout`), then stop and close the client."""
        self._closing = True
        self._wake.set()
        try:
            async with asyncio.timeout(self._close_timeout):
                for kind, state in self._kinds.items():
                    if state.pending.count:
                        await self._send(kind)
        except TimeoutError:
            log.warning("notifications still pending at stop were dropped")
        finally:
            await self._client.aclose()


def _summary(text: str) -> str:
    # A traceback's last line names the exception: the line an operator wants first.
    line = text.strip().splitlines()[-1] if text.strip() else ""
    return line if len(line) <= 200 else line[:199] + "…"
