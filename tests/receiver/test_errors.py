"""The receiver's error tree: one root, machine-readable reasons, docstring messages."""

from __future__ import annotations

import pytest

from falhook.receiver.errors import (
    CallbackImportError,
    CallbackTimeoutError,
    ForwardError,
    MalformedDeliveryError,
    NotStartedError,
    Reason,
    ReceiverError,
    SettingsError,
    StoreUnavailableError,
)


@pytest.mark.parametrize(
    ("cls", "reason"),
    [
        (SettingsError, "invalid_setting"),
        (StoreUnavailableError, "store_unavailable"),
        (NotStartedError, "receiver_not_started"),
        (CallbackImportError, "callback_import_error"),
        (CallbackTimeoutError, "callback_timeout"),
    ],
)
def test_every_error_has_a_reason_and_a_default_message(
    cls: type[ReceiverError], reason: str
) -> None:
    error = cls()
    assert isinstance(error, ReceiverError)
    assert error.reason == reason
    assert str(error) == (cls.__doc__ or "").strip()
    assert str(cls("custom")) == "custom"


def test_reasons_are_an_enum_on_every_error() -> None:
    for cls in (SettingsError, StoreUnavailableError, NotStartedError, CallbackImportError):
        assert isinstance(cls().reason, Reason)
    malformed = MalformedDeliveryError(Reason.INVALID_JSON, "not JSON")
    assert malformed.reason is Reason.INVALID_JSON
    assert str(malformed) == "not JSON"


def test_forward_error_joins_the_tree() -> None:
    error = ForwardError("POST http://app answered 500")
    assert isinstance(error, ReceiverError)
    assert error.reason is Reason.FORWARD_FAILED
