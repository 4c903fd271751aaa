"""A tiny in-process stand-in for fal's queue, for ``falhook demo`` only.

The demo must run offline from an installed falhook, so it cannot use the test suite's
full fake (tests/fakes/fal_queue.py, which is not installed). This one knows just enough
to show a recovery: submit answers with a request id and fal's URLs (owner/app only);
every request is COMPLETED at once; the result is a fixed image; and the webhook fal
would send is never sent (it was "lost"). Requests without ``Authorization: Key
<key>`` are answered 401, like fal.
"""

from __future__ import annotations

import uuid
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from falhook.receiver.recovery.urls import parse_endpoint_id

__all__ = ["DemoQueue"]


# A file the demo's CDN serves: a PNG signature and 4 KiB of made-up pixels.
DEMO_IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 16


class DemoQueue:
    """An ASGI app (`app`) answering submit, status and result for `key` at `base_url`."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.base_url = ""  # set once the server's port is known
        self.submitted: dict[str, dict[str, Any]] = {}  # request_id -> what was submitted
        self.calls: list[str] = []  # "METHOD path", for the demo's narration
        self.app = Starlette(
            routes=[Route("/{path:path}", self._endpoint, methods=["GET", "POST"])]
        )

    async def _endpoint(self, request: Request) -> Response:
        path = request.url.path
        if path.startswith("/files/") and request.method == "GET":
            # fal's media CDN (v3.fal.media) stands here too, for the archive's step.
            return Response(DEMO_IMAGE, media_type="image/png")
        self.calls.append(f"{request.method} {path}")
        if request.headers.get("authorization") != f"Key {self.key}":
            return JSONResponse({"detail": "Invalid API key"}, 401)
        if request.method == "POST":
            return await self._submit(request, path.strip("/"))
        _, _, rest = path.partition("/requests/")
        request_id, _, op = rest.partition("/")
        if request_id not in self.submitted:
            return JSONResponse({"detail": "Request not found"}, 404)
        if op == "status":
            return JSONResponse({"status": "COMPLETED", "request_id": request_id, "logs": None})
        prompt = self.submitted[request_id].get("prompt", "")
        return JSONResponse(
            {
                "images": [
                    {
                        "url": f"{self.base_url}/files/lighthouse.png",
                        "content_type": "image/png",
                        "width": 1024,
                        "height": 1024,
                    }
                ],
                "prompt": prompt,
                "seed": 17454220438242315174,
            }
        )

    async def _submit(self, request: Request, endpoint_id: str) -> Response:
        try:
            app = parse_endpoint_id(endpoint_id).app
        except ValueError as exc:
            return JSONResponse({"detail": str(exc)}, 404)
        request_id = str(uuid.uuid4())
        arguments = await request.json()
        self.submitted[request_id] = arguments if isinstance(arguments, dict) else {}
        base = f"{self.base_url}/{app}/requests/{request_id}"
        return JSONResponse(
            {
                "status": "IN_QUEUE",
                "request_id": request_id,
                "response_url": base,
                "status_url": f"{base}/status",
                "cancel_url": f"{base}/cancel",
                "queue_position": 0,
            }
        )
