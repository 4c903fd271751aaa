"""The smallest falhook receiver: two callbacks, run by uvicorn.

    FALHOOK_JWKS_URL=./jwks.json uvicorn minimal_app:app --app-dir examples --port 8000

(leave FALHOOK_JWKS_URL unset in production: it defaults to fal's published keys). Point
fal's ``webhook_url`` at ``https://your-host/webhooks/fal``. Deliveries are verified,
stored in ./falhook.db (FALHOOK_DATABASE_URL), answered 200, then handed to the callbacks;
a callback that raises is retried with backoff, and `falhook deliveries` shows the rest.
"""

from __future__ import annotations

from falhook.receiver.app import WebhookReceiver
from falhook.receiver.models import Delivery

hooks = WebhookReceiver()  # settings from FALHOOK_* environment variables


@hooks.on_ok
async def save_result(delivery: Delivery) -> None:
    images = (delivery.payload or {}).get("images", [])
    print(f"saved {delivery.request_id}: {len(images)} image(s)", flush=True)


@hooks.on_error
def record_failure(delivery: Delivery) -> None:  # sync callbacks run in a thread pool
    print(f"failed {delivery.request_id}: {delivery.error}", flush=True)


app = hooks.app
