"""falhook's receiver: verify → store → 200 → callbacks, durably.

The public API; import these from ``falhook.receiver`` directly. They are loaded on first
use (PEP 562), so that importing a light part of the package — the command line, whose
``--help`` must answer at once — does not pull in Starlette, SQLAlchemy and the rest.
"""

from typing import TYPE_CHECKING as _TYPE_CHECKING

from falhook.receiver.lazy import lazy_exports as _lazy_exports

if _TYPE_CHECKING:
    from falhook.receiver.app import WebhookReceiver, create_app
    from falhook.receiver.archive.media import MediaItem, MediaState
    from falhook.receiver.errors import (
        CallbackImportError,
        NotStartedError,
        ReceiverError,
        SettingsError,
        StoreUnavailableError,
    )
    from falhook.receiver.models import Delivery
    from falhook.receiver.registry import CallbackRegistry
    from falhook.receiver.retry import Retry, RetryPolicy
    from falhook.receiver.settings import Settings
    from falhook.receiver.state import State
    from falhook.receiver.store import Store
    from falhook.receiver.store.records import StoredDelivery

# Public name -> the module that defines it.
_EXPORTS = {
    "CallbackImportError": "errors",
    "CallbackRegistry": "registry",
    "Delivery": "models",
    "MediaItem": "archive.media",
    "MediaState": "archive.media",
    "NotStartedError": "errors",
    "ReceiverError": "errors",
    "Retry": "retry",
    "RetryPolicy": "retry",
    "Settings": "settings",
    "SettingsError": "errors",
    "State": "state",
    "Store": "store",
    "StoreUnavailableError": "errors",
    "StoredDelivery": "store.records",
    "WebhookReceiver": "app",
    "create_app": "app",
}

__all__ = [
    "CallbackImportError",
    "CallbackRegistry",
    "Delivery",
    "MediaItem",
    "MediaState",
    "NotStartedError",
    "ReceiverError",
    "Retry",
    "RetryPolicy",
    "Settings",
    "SettingsError",
    "State",
    "Store",
    "StoreUnavailableError",
    "StoredDelivery",
    "WebhookReceiver",
    "create_app",
]


__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals())
