"""Your application, next to a falhook sidecar (see docker-compose.yml and README.md).

The sidecar (`falhook serve --forward-to http://app:8080/fal-results`) verifies,
deduplicates and stores each delivery, then POSTs fal's body here byte for byte with
``x-falhook-request-id``, ``x-falhook-status`` and ``x-falhook-attempt`` headers. Answer
2xx once you have handled it; anything else (or no answer) is retried with backoff and
ends in ``falhook deliveries list --state dead`` if it keeps failing.

Only the sidecar should be able to reach this route: keep it on a private network.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI, HTTPException, Request

app = FastAPI()
results: dict[str, Any] = {}


@app.post("/fal-results")
async def fal_result(request: Request) -> dict[str, bool]:
    delivery = json.loads(await request.body())
    request_id = request.headers["x-falhook-request-id"]
    # A redelivery after a failed attempt is possible: make handling idempotent by id.
    results[request_id] = {
        "status": delivery["status"],
        "payload": delivery.get("payload"),
        "error": delivery.get("error"),
        "attempt": int(request.headers.get("x-falhook-attempt", "1")),
    }
    return {"ok": True}


@app.get("/results/{request_id}")
async def get_result(request_id: str) -> dict[str, Any]:
    if request_id not in results:
        raise HTTPException(404, "no result yet")
    found: dict[str, Any] = results[request_id]
    return found
