"""A loopback stand-in for fal's media CDN (``https://v3.fal.media/files/…``).

A real HTTP server (the standard library's, one thread per connection) on 127.0.0.1.
Files are made up from their path, streamed in 1 MiB pieces, never held whole, so a test
can serve hundreds of MiB. Every request is counted by path (`hits`), so a test can show
that a file was not fetched twice, or not at all.

===================================  ==========================================================
``/files/{name}?size=N``             N bytes (``content(name, N)``), Content-Type from the name
``/flaky/{name}?size=N&fail=K``      503 for the first K requests of that path, then the file
``/status/{code}/{name}``            that status
``/trickle/{name}?size=N&every=S``   the file, one 1 KiB piece every S seconds
``/redirect?to=URL``                 302 to URL
``…&nolength=1``                     the file without Content-Length (closed at its end)
===================================  ==========================================================
"""

from __future__ import annotations

import collections
import hashlib
import mimetypes
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qs, urlsplit

__all__ = ["MediaOrigin", "content", "sha256_of"]

_PIECE = 1024 * 1024


def _piece(name: str, index: int) -> bytes:
    seed = hashlib.sha256(f"{name}:{index % 7}".encode()).digest()
    return (seed * (_PIECE // len(seed) + 1))[:_PIECE]


def content(name: str, size: int) -> bytes:
    """The bytes served for `name` at `size` (for small files: compare whole)."""
    return b"".join(_pieces(name, size))


def _pieces(name: str, size: int, piece: int = _PIECE) -> Iterator[bytes]:
    sent, index = 0, 0
    while sent < size:
        chunk = _piece(name, index)[: min(piece, size - sent)]
        sent += len(chunk)
        index += 1
        yield chunk


def sha256_of(name: str, size: int) -> str:
    digest = hashlib.sha256()
    for chunk in _pieces(name, size):
        digest.update(chunk)
    return digest.hexdigest()


class MediaOrigin:
    """Start with ``with MediaOrigin() as origin:``; `origin.url` is its base URL."""

    def __init__(self) -> None:
        self.hits: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                origin._serve(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> MediaOrigin:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self, path: str) -> int:
        with self._lock:
            return self.hits[path]

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        with self._lock:
            self.hits[parts.path] += 1
            seen = self.hits[parts.path]
        segments = parts.path.strip("/").split("/")
        kind, name = segments[0], segments[-1]
        size = int(query.get("size", "1000"))
        if kind == "status":
            self._answer(handler, int(segments[1]))
        elif kind == "redirect":
            handler.send_response(302)
            handler.send_header("Location", query["to"])
            handler.send_header("Content-Length", "0")
            handler.end_headers()
        elif kind == "flaky" and seen <= int(query.get("fail", "1")):
            self._answer(handler, 503)
        elif kind in ("files", "flaky"):
            self._file(handler, name, size, length="nolength" not in query)
        elif kind == "trickle":
            self._file(handler, name, size, piece=1024, every=float(query.get("every", "0.2")))
        else:
            self._answer(handler, 404)

    def _answer(self, handler: BaseHTTPRequestHandler, status: int) -> None:
        handler.send_response(status)
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    def _file(
        self,
        handler: BaseHTTPRequestHandler,
        name: str,
        size: int,
        *,
        piece: int = _PIECE,
        every: float = 0.0,
        length: bool = True,
    ) -> None:
        handler.send_response(200)
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        handler.send_header("Content-Type", kind)
        if length:
            handler.send_header("Content-Length", str(size))
        else:
            handler.send_header("Connection", "close")
            handler.close_connection = True
        handler.end_headers()
        try:
            for chunk in _pieces(name, size, piece):
                handler.wfile.write(chunk)
                if every:
                    handler.wfile.flush()
                    time.sleep(every)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (a size cap, a killed process)
