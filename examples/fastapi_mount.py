"""falhook mounted inside an existing FastAPI app.

    FALHOOK_JWKS_URL=./jwks.json uvicorn fastapi_mount:app --app-dir examples

fal's ``webhook_url`` is then ``https://your-host/fal/webhooks/fal``. Starlette runs only
the outermost app's lifespan, so the host must run the receiver's: pass
``lifespan=hooks.lifespan`` (or ``async with hooks:`` inside a lifespan of your own).
Without it, deliveries get a 503 ``receiver_not_started`` and fal retries them.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Request

from falhook.receiver.app import WebhookReceiver
from falhook.receiver.models import Delivery
from falhook.receiver.settings import Settings


def create_app(settings: Settings | None = None) -> FastAPI:
    hooks = WebhookReceiver(settings)
    results: dict[str, Any] = {}

    @hooks.on_delivery
    async def remember(delivery: Delivery) -> None:
        results[delivery.request_id] = {
            "status": delivery.status,
            "payload": delivery.payload,
            "error": delivery.error,
        }

    app = FastAPI(lifespan=hooks.lifespan)
    app.mount("/fal", hooks.app)  # POST /fal/webhooks/fal, GET /fal/healthz, /fal/metrics
    app.state.results = results

    @app.get("/results/{request_id}")
    async def get_result(request_id: str, request: Request) -> dict[str, Any]:
        found: dict[str, Any] | None = request.app.state.results.get(request_id)
        if found is None:
            raise HTTPException(404, "no result yet")
        return found

    return app


app = create_app()
