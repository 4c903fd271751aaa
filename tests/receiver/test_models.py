"""What callbacks receive: the delivery parsed from the stored raw body."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from falhook.receiver.models import Delivery, State


def test_from_body_keeps_every_field_and_the_raw_bytes() -> None:
    raw = (
        b'{"error": null, "extra": {"kept": true}, "gateway_request_id": "g-1", '
        b'"payload": {"seed": 17454220438242315174}, "request_id": "r-1", "status": "OK"}'
    )
    delivery = Delivery.from_body(raw, attempt=2, received_at=1_700_000_000.5, user_id="u-1")
    assert delivery.request_id == "r-1"
    assert delivery.gateway_request_id == "g-1"
    assert delivery.ok and delivery.status == "OK"
    assert delivery.payload == {"seed": 17454220438242315174}  # beyond 2**53, exact
    assert delivery.error is None and delivery.payload_error is None
    assert delivery.attempt == 2
    assert delivery.received_at == datetime.fromtimestamp(1_700_000_000.5, UTC)
    assert delivery.raw_body is raw
    assert delivery.json()["extra"] == {"kept": True}


def test_error_and_payload_error_deliveries() -> None:
    error = Delivery.from_body(
        json.dumps(
            {
                "request_id": "r",
                "status": "ERROR",
                "error": "Invalid status code: 422",
                "payload": {"detail": []},
            }
        ).encode(),
        attempt=1,
        received_at=0.0,
    )
    assert not error.ok and error.error == "Invalid status code: 422"
    unserialisable = Delivery.from_body(
        b'{"request_id": "r", "status": "OK", "payload": null, "payload_error": "not JSON"}',
        attempt=1,
        received_at=0.0,
    )
    assert unserialisable.ok and unserialisable.payload is None
    assert unserialisable.payload_error == "not JSON"


def test_already_parsed_body_is_used_as_is() -> None:
    parsed = {"request_id": "r", "status": "OK", "payload": {"a": 1}}
    delivery = Delivery.from_body(b"not parsed again", attempt=1, received_at=0.0, parsed=parsed)
    assert delivery.payload == {"a": 1}


def test_states_are_the_stored_strings() -> None:
    assert [s.value for s in State] == ["pending", "running", "done", "dead"]
