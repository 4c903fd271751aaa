"""Errors raised by the receiver package.

The tree::

    ReceiverError                 root of everything receiver raises on purpose
    ├── SettingsError             a setting (env var or flag) has an unusable value
    ├── StoreUnavailableError     the store could not be reached or could not commit (503)
    ├── NotStartedError           a delivery arrived before the dispatcher was started (503)
    ├── CallbackImportError       a ``module:function`` callback could not be imported
    └── CallbackTimeoutError      a callback did not return within its timeout (a failure)

Foreign exceptions (SQLAlchemy, driver, OS errors) are wrapped at the store's edge with
``raise StoreUnavailableError(...) from exc`` so callers never branch on driver types.
"""

from __future__ import annotations

__all__ = [
    "CallbackImportError",
    "CallbackTimeoutError",
    "NotStartedError",
    "ReceiverError",
    "SettingsError",
    "StoreUnavailableError",
]


class ReceiverError(Exception):
    """Root of the errors raised by `receiver`."""

    reason = "receiver_error"

    def __init__(self, message: str | None = None) -> None:
        # The class docstring is the default message, so subclasses need only a docstring.
        super().__init__(message or (type(self).__doc__ or type(self).__name__).strip())


class SettingsError(ReceiverError):
    """A setting has an unusable value."""

    reason = "invalid_setting"


class StoreUnavailableError(ReceiverError):
    """The store could not be reached or could not commit."""

    reason = "store_unavailable"


class NotStartedError(ReceiverError):
    """The receiver was not started: its lifespan (dispatcher and store) never ran."""

    reason = "receiver_not_started"


class CallbackImportError(ReceiverError):
    """A ``module:function`` callback could not be imported."""

    reason = "callback_import_error"


class CallbackTimeoutError(ReceiverError):
    """A callback did not return within FALHOOK_CALLBACK_TIMEOUT_SECONDS."""

    reason = "callback_timeout"
