"""A loopback stand-in for fal's platform API (``https://api.fal.ai/v1``): the payload
purge, ``DELETE /models/requests/{request_id}/payloads``.

A real HTTP server on 127.0.0.1 that records every call (path, Authorization,
Idempotency-Key) and answers 200 ``{}``, or, for a request id in `answers`, the statuses
given there one call after another (the last one repeats).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

__all__ = ["Call", "FakeFalPlatform"]

_PREFIX = "/models/requests/"
_SUFFIX = "/payloads"


@dataclass(frozen=True)
class Call:
    method: str
    request_id: str | None
    authorization: str | None
    idempotency_key: str | None


class FakeFalPlatform:
    """Start with ``with FakeFalPlatform() as platform:``; `platform.url` stands for
    ``https://api.fal.ai/v1``."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.answers: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        platform = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_DELETE(self) -> None:
                platform._serve(self)

            def do_GET(self) -> None:
                platform._serve(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeFalPlatform:
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

    def purges(self, request_id: str) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.request_id == request_id]

    def _serve(self, handler: BaseHTTPRequestHandler) -> None:
        path = handler.path
        request_id = None
        if path.startswith(_PREFIX) and path.endswith(_SUFFIX):
            request_id = path[len(_PREFIX) : -len(_SUFFIX)]
        call = Call(
            handler.command,
            request_id,
            handler.headers.get("Authorization"),
            handler.headers.get("Idempotency-Key"),
        )
        with self._lock:
            self.calls.append(call)
            queued = self.answers.get(request_id or "")
            status = (queued.pop(0) if len(queued) > 1 else queued[0]) if queued else 200
        if handler.command != "DELETE" or request_id is None:
            status = 404
        body = b"{}" if status < 400 else b'{"detail": "no"}'
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
