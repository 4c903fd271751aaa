"""falhook's receiver: verify → store → 200 → callbacks, durably.

The public API; import these from ``receiver`` directly.
"""

from falhook.receiver.app import WebhookReceiver, create_app
from falhook.receiver.errors import (
    CallbackImportError,
    NotStartedError,
    ReceiverError,
    SettingsError,
    StoreUnavailableError,
)
from falhook.receiver.models import Delivery, State, StoredDelivery
from falhook.receiver.registry import CallbackRegistry
from falhook.receiver.retry import Retry, RetryPolicy
from falhook.receiver.settings import Settings
from falhook.receiver.store import Store

__all__ = [
    "CallbackImportError",
    "CallbackRegistry",
    "Delivery",
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
