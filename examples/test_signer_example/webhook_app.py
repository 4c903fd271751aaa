"""A user's own webhook endpoint that uses only `verify_signature` (no falhook receiver).

The test beside it (test_webhook_app.py) signs deliveries with `falhook.verify.testing`, exactly as
fal does, and serves the test key's JWKS on loopback — no network, no mocks of falhook.
"""

from __future__ import annotations

import json
import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from falhook.verify import KeysUnavailableError, WebhookVerificationError, verify_signature_async

received: dict[str, Any] = {}


async def fal_webhook(request: Request) -> JSONResponse:
    body = await request.body()  # the raw bytes: verify before parsing
    try:
        verified = await verify_signature_async(
            body, request.headers, jwks_url=os.environ.get("FAL_JWKS_URL")
        )
    except WebhookVerificationError as exc:
        return JSONResponse({"error": exc.reason.value}, status_code=401)
    except KeysUnavailableError as exc:  # cannot decide yet
        return JSONResponse({"error": exc.reason.value}, status_code=503)  # fal retries
    delivery = json.loads(body)
    received[verified.request_id] = delivery
    return JSONResponse({"ok": True})


app = Starlette(routes=[Route("/webhooks/fal", fal_webhook, methods=["POST"])])
