"""uvicorn's httptools protocol with the limits it lacks: a deadline on a request's head
and a cap on its size; JSON errors for what cannot be parsed; and when the request arrived.

uvicorn closes a connection that idles *after* a response (``timeout_keep_alive``) but
arms nothing while it waits for a request's head: a client that connects and sends
nothing, or one header line every few seconds, held its connection (and a slot of
``limit_concurrency``) forever. Nor does httptools bound the head's size.

A request's bytes may wait in the kernel before the loop reads them (a loop blocked by
an ``async def`` callback, or just busy). On Linux the kernel says how long ago the
connection last received data (``TCP_INFO``'s ``tcpi_last_data_recv``, in milliseconds
and counted in scheduler ticks), so the time a request waited there is counted as part of
its acknowledgement's latency: from its latest bytes' arrival, less a tick.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import sys
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["ARRIVED", "MAX_HEAD_BYTES", "PEER", "http_protocol"]

log = logging.getLogger("falhook.receiver")
ARRIVED = "falhook.arrived"  # scope key: time.perf_counter() when the request arrived
# Scope key: the address of the connection's other end. uvicorn replaces "client" with the
# address a trusted proxy's X-Forwarded-For claims; this one says who actually connected.
PEER = "falhook.peer"
MAX_HEAD_BYTES = 64 * 1024  # request line + headers; fal's are well under 2 KB
# struct tcp_info: eight one-byte fields, then u32s; tcpi_last_data_recv is the twelfth.
_LAST_DATA_RECV = 8 + 11 * 4
_TCP_INFO: int | None = getattr(socket, "TCP_INFO", None) if sys.platform == "linux" else None
# The kernel's clock ticks at 100-1000 Hz: a wait up to a tick may be rounding, so what
# it says is counted less 10 ms (and a request read sooner than that counts from the read).
_TICK = 0.010


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
        self._head_done = False  # what httptools reports as a header now is a trailer
        self._socket: Any = None  # the transport's socket, to ask the kernel (TCP_INFO)

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
        if _TCP_INFO is not None:
            self._socket = transport.get_extra_info("socket")
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def eof_received(self) -> bool | None:  # type: ignore[override]  # asyncio allows a bool
        # The client is done sending (a half-close after its request). With a request in
        # flight, keep the connection open to answer it, then close; asyncio would close
        # it now, and the stored delivery's 200 would never be sent.
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False
            return True
        return None

    def on_message_begin(self) -> None:
        # Between requests uvicorn's keep-alive timeout covers the idle connection; the
        # head's deadline starts again with the next request's first byte.
        self._head_bytes = 0
        self._head_done = False
        self._arm()
        super().on_message_begin()
        # The route times the acknowledgement from here: the request's first bytes were
        # read now, less the time they waited in the kernel for the loop to read them.
        arrived = time.perf_counter() - self._waited()
        self.scope[ARRIVED] = arrived  # type: ignore[literal-required]
        if self.client is not None:
            self.scope[PEER] = self.client[0]  # type: ignore[literal-required]

    def _waited(self) -> float:
        """Seconds this connection's latest bytes have waited in the kernel (a lower bound;
        0 below a clock tick, or where the kernel does not say)."""
        if self._socket is None:
            return 0.0
        try:
            info = self._socket.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _LAST_DATA_RECV + 4)
            waited: float = struct.unpack_from("I", info, _LAST_DATA_RECV)[0] / 1000
        except (OSError, struct.error):  # not TCP (a Unix socket), or an older kernel
            self._socket = None
            return 0.0
        return waited - _TICK if waited > _TICK else 0.0

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            # A chunked body's trailer: uvicorn would add it to the request's headers, so a
            # signature header sent as a trailer would count, depending on when it arrived.
            return
        self._count(len(name) + len(value))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        self._head_done = True
        if self.parser.should_upgrade():
            # fal never switches protocols. uvicorn would run the request without its body
            # (httptools stops at the head of an upgrade), so an authentic delivery would
            # fail its signature check, or hand the connection to a WebSocket handler with
            # no deadline. One JSON 400 instead, and the connection closed.
            self._refuse(b"400 Bad Request", _UPGRADE)
            return
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            # uvicorn's own answer here is a plain-text 503 on a kept connection.
            log.warning("connection limit reached (FALHOOK_MAX_CONNECTIONS): answered 503")
            self._refuse(b"503 Service Unavailable", _TOO_MANY_CONNECTIONS)
            return
        super().on_headers_complete()

    def _unsupported_upgrade_warning(self) -> None:
        pass  # answered above: 400 upgrade_not_supported

    def _count(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            # Raising stops the parser; uvicorn then answers a parse error, which
            # send_400_response turns into a 431.
            self._head_too_large = True
            raise ValueError("request head too large")

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to a request httptools cannot parse is plain text; every other
        # answer of the receiver is a JSON error with a machine-readable reason.
        cycle = self.cycle
        if cycle is not None and not cycle.more_body and not cycle.response_complete:
            # Bytes that cannot be parsed after a whole request still being answered
            # (pipelined): a 400 now would go out in its place, while it is stored and
            # acknowledged all the same. It gets its own answer; then the connection closes.
            # (A body that cannot be parsed, a bad chunk, is this request's: 400 now.)
            cycle.keep_alive = False
            self.flow.pause_reading()
            return
        if self._head_too_large:
            self._refuse(b"431 Request Header Fields Too Large", _HEAD_TOO_LARGE)
        else:
            self._refuse(b"400 Bad Request", _MALFORMED)

    def _refuse(self, status: bytes, body: bytes) -> None:
        """Answer a JSON error from the protocol itself, and close the connection."""
        self._disarm()
        if self.transport.is_closing():
            return
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\n"
            b"content-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.transport.close()


_HEAD_TOO_LARGE = b'{"error":"headers_too_large","detail":"request head exceeds 65536 bytes"}'
_UPGRADE = b'{"error":"upgrade_not_supported","detail":"this server speaks HTTP/1.1 only"}'
_TOO_MANY_CONNECTIONS = (
    b'{"error":"too_many_connections","detail":"the receiver holds FALHOOK_MAX_CONNECTIONS '
    b'connections; try again"}'
)
_MALFORMED = (
    b'{"error":"malformed_request","detail":"not an HTTP/1.1 request this server can parse '
    b'(request line, header syntax, Content-Length or Transfer-Encoding)"}'
)
