"""An expectation, validated and recorded: what ``expect`` and ``submit`` write.

No httpx: ``falhook expect`` (a store command: it records one row) runs only this, on an
`Admin` of its own; `Recovery` (service.py) validates and records through the same two
functions.
"""

from __future__ import annotations

import logging

from falhook.receiver.errors import InvalidRequestError
from falhook.receiver.recovery.urls import parse_endpoint_id, same_origin
from falhook.receiver.settings import Settings
from falhook.receiver.store.expectations import Expectations, ExpectationState, NewExpectation

__all__ = ["logged", "new_expectation", "record_sync"]

log = logging.getLogger("falhook.recovery")


def new_expectation(
    request_id: str,
    endpoint_id: str,
    *,
    queue_url: str,
    status_url: str | None = None,
    response_url: str | None = None,
    origin: str = "expect",
) -> NewExpectation:
    """Validate what ``expect`` was given (raises InvalidRequestError): fal's URLs must be
    on `queue_url`, the only host the fal key is sent to."""
    request_id = request_id.strip()
    if not request_id or len(request_id) > 255 or not request_id.isprintable():
        raise InvalidRequestError(f"{request_id!r} is not a fal request id")
    try:
        endpoint = parse_endpoint_id(endpoint_id).full
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    for url in (status_url, response_url):
        if url is not None and not same_origin(url, queue_url):
            raise InvalidRequestError(
                f"{url} is not on fal's queue ({queue_url}); falhook sends the fal key only there"
            )
    return NewExpectation(request_id, endpoint, status_url, response_url, origin)


def record_sync(settings: Settings, new: NewExpectation, *, migrate: bool) -> bool:
    """Record `new` on a connection of its own, beside whatever runs; True if new.

    With `migrate` (an unstarted receiver: its own start would) the schema is created or
    upgraded first, through a `Store`. Without (the CLI: only `falhook serve` migrates) it
    is checked, changing nothing, on an `Admin` of its own: a missing or
    older schema raises StoreSchemaError, an unreachable store StoreUnavailableError.
    """
    add = {"recover_after": settings.recover_after_seconds, "ttl": settings.expect_ttl_seconds}
    if migrate:
        from falhook.receiver.store.store import Store

        store = Store(settings.database_url)
        try:
            store.migrate()
            recorded = Expectations(store).add(new, **add)
        finally:
            store.engine.dispose()
    else:
        from falhook.receiver.store.admin import Admin

        admin = Admin.open(settings.database_url)
        try:
            recorded = Expectations(admin).add(new, **add)
        finally:
            admin.close()
    logged(new, recorded)
    return recorded


def logged(new: NewExpectation, recorded: bool) -> None:
    """Log that `new` was recorded (or already was)."""
    log.info(
        "expectation recorded" if recorded else "expectation already recorded",
        extra={
            "request_id": new.request_id,
            "endpoint_id": new.endpoint_id,
            "origin": new.origin,
            "state": ExpectationState.WAITING.value if recorded else None,
        },
    )
