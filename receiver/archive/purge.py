"""Purge at fal (FALHOOK_FAL_PURGE): once every file of a delivery is archived, delete
fal's stored payload and output files (not the inputs) through fal's platform API:
``DELETE {FALHOOK_PLATFORM_URL}/models/requests/{request_id}/payloads``.

Never called while any file of the delivery is not archived (failed, skipped or pending).
The same Idempotency-Key for every try of a request, so a retry deletes nothing twice.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import quote

import httpx

from falhook.receiver.retry import Backoff

__all__ = ["Purger"]

log = logging.getLogger("falhook.archive")
_TRIES = 4
_TRANSIENT = frozenset({408, 409, 425, 429})


class Purger:
    """Calls fal's platform API to delete a request's payloads."""

    def __init__(
        self, platform_url: str, key: str, client: httpx.AsyncClient, *, first_backoff: float = 1.0
    ) -> None:
        self.platform_url = platform_url.rstrip("/")
        self._key = key
        self._client = client
        self._first_backoff = first_backoff

    def url(self, request_id: str) -> str:
        return f"{self.platform_url}/models/requests/{quote(request_id, safe='')}/payloads"

    async def purge(self, request_id: str) -> tuple[bool, int | None, str | None]:
        """Delete `request_id`'s payloads at fal, retried with backoff when fal cannot answer
        now: (done, fal's last status code, error)."""
        headers = {
            "Authorization": f"Key {self._key}",
            "Idempotency-Key": f"falhook-purge-{request_id}",
        }
        backoff = Backoff(self._first_backoff, 30.0)
        status: int | None = None
        error: str | None = None
        for attempt in range(1, _TRIES + 1):
            try:
                response = await self._client.delete(self.url(request_id), headers=headers)
            except httpx.HTTPError as exc:
                status, error = None, f"unreachable: {type(exc).__name__}: {exc}"
            else:
                status = response.status_code
                if 200 <= status < 300:
                    return True, status, None
                error = f"fal answered {status}: {response.text[:300]}"
                if status < 500 and status not in _TRANSIENT:
                    break  # 401, 403, 404…: asking again will not change it
            if attempt < _TRIES:
                await asyncio.sleep(backoff.failed())
        log.warning("purge of %s at fal failed: %s", request_id, error)
        return False, status, error
