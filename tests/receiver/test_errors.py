"""The receiver's error tree: one root, machine-readable reasons, docstring messages."""

from __future__ import annotations

import pytest

from falhook.receiver.errors import (
    CallbackImportError,
    CallbackTimeoutError,
    NotStartedError,
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
