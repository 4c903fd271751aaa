"""falhook's receiver: verify → store → 200 → callbacks, durably.

The public API; import these from ``receiver`` directly.
"""

from receiver.app import WebhookReceiver, create_app
from receiver.errors import (
    CallbackImportError,
    NotStartedError,
    ReceiverError,
    SettingsError,
    StoreUnavailableError,
)
from receiver.models import Delivery, State, StoredDelivery
from receiver.registry import CallbackRegistry
from receiver.retry import Retry, RetryPolicy
from receiver.settings import Settings
from receiver.store import Store

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
