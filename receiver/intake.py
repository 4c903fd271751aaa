"""Accepting one delivery: verify, parse, insert (commit), and hand it to the dispatcher.

This is the whole of the receiver's side of a delivery's path up to the 200; the route
(routes.py) only speaks HTTP around it. Nothing here answers before the commit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from falhook.receiver.deadlines import Deadlines
from falhook.receiver.dispatcher import Dispatcher
from falhook.receiver.errors import MalformedDeliveryError, Reason, StoreUnavailableError
from falhook.receiver.keysource import KeySource
from falhook.receiver.store import Claim, NewDelivery, Store
from falhook.receiver.store.records import column_text
from falhook.verify import WebhookHeaders

if TYPE_CHECKING:
    from falhook.receiver.tracing.spans import Tracing

__all__ = ["MAX_REQUEST_ID_CHARS", "Accepted", "Intake"]

log = logging.getLogger("falhook.receiver")

MAX_REQUEST_ID_CHARS = 255  # fal's are UUIDs; anything longer is not fal's

_PARSE_IN_THREAD_BYTES = 256 * 1024  # parsing megabytes of JSON would stall the loop


class Accepted(NamedTuple):
    """A delivery committed to the store (or found there already)."""

    request_id: str
    duplicate: bool


class Intake:
    """Verifies, parses and stores deliveries for one started receiver."""

    def __init__(
        self,
        keys: KeySource,
        store: Store,
        dispatcher: Dispatcher | None,
        *,
        lease_seconds: float,
        store_timeout: float = 10.0,
        deadlines: Deadlines | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.keys = keys
        self.tracing = tracing
        self.store = store
        self.dispatcher = dispatcher
        self.lease_seconds = lease_seconds
        self.store_timeout = store_timeout
        self.deadlines = deadlines or Deadlines()

    async def accept(self, body: bytes, checked: WebhookHeaders) -> Accepted:
        """Verify ``body`` against headers `check_headers` passed, parse it and durably
        store it; dispatch it at once if a slot is free.

        :raises WebhookVerificationError: not authentic (401).
        :raises KeysUnavailableError: no keys to check with (503).
        :raises MalformedDeliveryError: authentic but not a delivery we can store (400).
        :raises StoreUnavailableError: the store cannot commit (503).
        """
        verified = await self.keys.verify(body, checked)
        data = await _parse(body)
        request_id = data.get("request_id")
        if not isinstance(request_id, str) or not request_id:
            raise MalformedDeliveryError(Reason.MISSING_REQUEST_ID, "body has no request_id string")
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise MalformedDeliveryError(
                Reason.REQUEST_ID_TOO_LONG, f"request_id is over {MAX_REQUEST_ID_CHARS} characters"
            )
        if request_id != verified.request_id:
            raise MalformedDeliveryError(
                Reason.REQUEST_ID_MISMATCH, "body request_id differs from the signed header"
            )
        status = data.get("status")
        if status not in ("OK", "ERROR"):
            raise MalformedDeliveryError(Reason.INVALID_STATUS, 'status must be "OK" or "ERROR"')
        new = NewDelivery(
            request_id=request_id,
            gateway_request_id=_text(data.get("gateway_request_id")),
            status=status,
            error=_text(data.get("error")),
            payload_error=_text(data.get("payload_error")),
            user_id=verified.user_id,
            signed_at=verified.timestamp,
            body=body,
            received_at=time.time(),
            # Traced: the request's span, for the processing spans to link to.
            trace_context=None if self.tracing is None else self.tracing.current_context(),
        )
        if self.tracing is None:
            return Accepted(request_id, await self._store(new, data))
        with self.tracing.storing(self.store.dialect) as span:
            duplicate = await self._store(new, data)
            span.set_attribute("falhook.duplicate", duplicate)
        return Accepted(request_id, duplicate)

    async def _store(self, new: NewDelivery, data: dict[str, Any]) -> bool:
        """Commit `new`, and hand it to the dispatcher if a slot is free; True for a
        duplicate."""
        dispatcher = self.dispatcher
        claim_id = dispatcher.reserve() if dispatcher is not None else None
        try:
            # Bounded: fal gives up after 15 s. If the insert commits after all, fal's
            # retry is answered as a duplicate (and a claimed row's lease expires).
            async with self.deadlines.scope(self.store_timeout):
                if claim_id is None:
                    # No free slot (or no callbacks): stored pending, claimed by whoever is free.
                    return not await self.store.insert(new)
                # Stored already claimed by a slot we hold: dispatched as soon as committed,
                # without a claim round trip or a second parse of the body.
                claim = await self.store.insert_claimed(
                    new,
                    claim_id,
                    lease_seconds=self.lease_seconds,
                    parsed=data,
                    on_late=self._committed_late,
                )
                if claim is not None:
                    # Before `finally` gives the reservation back: adopting takes it over,
                    # so the slot is never counted free while the callbacks start.
                    dispatcher.adopt(claim)  # type: ignore[union-attr]
        except TimeoutError:
            raise StoreUnavailableError(
                f"no commit within {self.store_timeout:g} s (FALHOOK_STORE_TIMEOUT_SECONDS)"
            ) from None
        finally:
            if claim_id is not None:
                dispatcher.release(claim_id)  # type: ignore[union-attr]  # no-op once adopted
        return claim is None

    def _committed_late(self, claim: Claim | None) -> None:
        """An insert whose request stopped waiting (503 after the store timeout, or the
        client gone) committed after all: its callbacks run now, not once its lease ends."""
        if claim is None or self.dispatcher is None:
            return  # not stored (a duplicate, a failure): fal's retry brings it again
        log.warning(
            "delivery committed after its 503 (or its client left): dispatched now",
            extra={"request_id": claim.request_id},
        )
        self.dispatcher.adopt(claim)


async def _parse(body: bytes) -> dict[str, Any]:
    try:
        if len(body) > _PARSE_IN_THREAD_BYTES:
            data = await asyncio.to_thread(_loads, body)
        else:
            data = _loads(body)
    except ValueError:
        raise MalformedDeliveryError(Reason.INVALID_JSON, "body is not valid UTF-8 JSON") from None
    except RecursionError:
        raise MalformedDeliveryError(
            Reason.INVALID_JSON, "body is JSON nested too deeply to read"
        ) from None
    if not isinstance(data, dict):
        raise MalformedDeliveryError(Reason.INVALID_JSON, "body is not a JSON object")
    return data


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


# Python's json reads NaN and Infinity, which are not JSON: a body with them is refused
# like any other that is not JSON (json.loads(s) is this same call on a default decoder).
_DECODER = json.JSONDecoder(parse_constant=_not_json)


def _loads(body: bytes) -> Any:
    # Decoded first: json.loads(bytes) would also sniff for UTF-16/32, which fal never
    # sends, on every delivery. Both steps run where the caller put the parse (a
    # thread for big bodies): decoding megabytes is no cheaper than parsing them.
    return _DECODER.decode(body.decode())


def _text(value: Any) -> str | None:
    """A column's text for a field fal documents as a string (kept verbatim in the body)."""
    if value is None:
        return None
    if not isinstance(value, str):
        return json.dumps(value)  # escapes NUL and lone surrogates
    # NUL or a lone surrogate: the column gets U+FFFD; the raw body keeps the original.
    return column_text(value)
