"""uvicorn's httptools protocol with the limits it lacks: a deadline on a request's head
and a cap on its size.

uvicorn closes a connection that idles *after* a response (``timeout_keep_alive``) but
arms nothing while it waits for a request's head: a client that connects and sends
nothing, or one header line every few seconds, held its connection (and a slot of
``limit_concurrency``) forever. Nor does httptools bound the head's size.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["ARRIVED", "MAX_HEAD_BYTES", "http_protocol"]

log = logging.getLogger("falhook.receiver")
ARRIVED = "falhook.arrived"  # scope key: time.perf_counter() at the request's first byte
MAX_HEAD_BYTES = 64 * 1024  # request line + headers; fal's are well under 2 KB


def http_protocol(header_timeout: float) -> type[HttpToolsProtocol]:
    """A protocol class closing connections whose request head is not complete within
    `header_timeout` seconds of the connection (or of the previous response)."""

    class Protocol(_LimitedProtocol):
        timeout = header_timeout

    return Protocol


class _LimitedProtocol(HttpToolsProtocol):
    timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._head_too_large = False

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            log.debug("closing a connection whose request head did not arrive in time")
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        # Between requests uvicorn's keep-alive timeout covers the idle connection; the
        # head's deadline starts again with the next request's first byte.
        self._head_bytes = 0
        self._arm()
        super().on_message_begin()
        # When the request's first bytes were read: the route times its acknowledgement
        # from here, so time spent queued behind a busy loop counts.
        self.scope[ARRIVED] = time.perf_counter()  # type: ignore[literal-required]

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            # Raising stops the parser; uvicorn then answers a parse error, which
            # send_400_response turns into a 431.
            self._head_too_large = True
            raise ValueError("request head too large")

    def send_400_response(self, msg: str) -> None:
        self._disarm()
        if not self._head_too_large:
            super().send_400_response(msg)
            return
        body = b'{"error":"headers_too_large","detail":"request head exceeds 65536 bytes"}'
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.transport.close()
