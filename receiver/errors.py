"""Errors raised by the receiver package.

The tree::

    ReceiverError                 root of everything receiver raises on purpose
    ├── SettingsError             a setting (env var or flag) has an unusable value
    ├── StoreUnavailableError     the store could not be reached or could not commit (503)
    ├── StoreSchemaError          the store has no falhook schema, or not this version's
    ├── NotStartedError           a delivery arrived before the dispatcher was started (503)
    ├── MalformedDeliveryError    verified, but not a delivery we can store (400)
    ├── CallbackImportError       a ``module:function`` callback could not be imported
    ├── CallbackTimeoutError      a callback did not return within its timeout (a failure)
    ├── ForwardError              the app behind ``--forward-to`` did not take a delivery
    ├── RecoveryDisabledError     submit/expect without a fal key (FALHOOK_FAL_KEY)
    ├── InvalidRequestError       submit/expect given an unusable endpoint id or URL
    └── QueueError                fal's queue refused or could not be reached (``failure``)

Every error carries ``.reason``, a `Reason` (a string enum) for machines: the HTTP
answers' ``error`` field, metrics labels and the CLI's JSON output use it. Foreign
exceptions (SQLAlchemy, driver, OS errors) are wrapped at the store's edge with
``raise StoreUnavailableError(...) from exc`` so callers never branch on driver types.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "CallbackImportError",
    "CallbackTimeoutError",
    "ForwardError",
    "InvalidRequestError",
    "MalformedDeliveryError",
    "NotStartedError",
    "QueueError",
    "QueueFailure",
    "Reason",
    "ReceiverError",
    "RecoveryDisabledError",
    "SettingsError",
    "StoreSchemaError",
    "StoreUnavailableError",
]


class Reason(StrEnum):
    """Machine-readable reason of a `ReceiverError`."""

    RECEIVER_ERROR = "receiver_error"
    INVALID_SETTING = "invalid_setting"
    STORE_UNAVAILABLE = "store_unavailable"
    STORE_SCHEMA = "store_schema"
    RECEIVER_NOT_STARTED = "receiver_not_started"
    CALLBACK_IMPORT_ERROR = "callback_import_error"
    CALLBACK_TIMEOUT = "callback_timeout"
    FORWARD_FAILED = "forward_failed"
    # A verified delivery that cannot be stored as one (answered 400).
    INVALID_JSON = "invalid_json"
    MISSING_REQUEST_ID = "missing_request_id"
    REQUEST_ID_TOO_LONG = "request_id_too_long"
    REQUEST_ID_MISMATCH = "request_id_mismatch"
    INVALID_STATUS = "invalid_status"
    # Recovery from fal's queue (receiver/recovery/).
    RECOVERY_DISABLED = "recovery_disabled"
    INVALID_REQUEST = "invalid_request"
    QUEUE_ERROR = "queue_error"


class ReceiverError(Exception):
    """Root of the errors raised by `receiver`."""

    reason: Reason = Reason.RECEIVER_ERROR

    def __init__(self, message: str | None = None) -> None:
        # The class docstring is the default message, so subclasses need only a docstring.
        super().__init__(message or (type(self).__doc__ or type(self).__name__).strip())


class SettingsError(ReceiverError):
    """A setting has an unusable value."""

    reason = Reason.INVALID_SETTING


class StoreUnavailableError(ReceiverError):
    """The store could not be reached or could not commit."""

    reason = Reason.STORE_UNAVAILABLE


class StoreSchemaError(ReceiverError):
    """The store has no falhook schema, or not the version this falhook needs.

    Raised by the store commands, which never create or upgrade a schema (`serve` does).
    """

    reason = Reason.STORE_SCHEMA


class NotStartedError(ReceiverError):
    """The receiver was not started: its lifespan (dispatcher and store) never ran."""

    reason = Reason.RECEIVER_NOT_STARTED


class MalformedDeliveryError(ReceiverError):
    """An authentic delivery that is not one we can store (not JSON, no request_id, ...)."""

    def __init__(self, reason: Reason, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class CallbackImportError(ReceiverError):
    """A ``module:function`` callback could not be imported."""

    reason = Reason.CALLBACK_IMPORT_ERROR


class CallbackTimeoutError(ReceiverError):
    """A callback did not return within FALHOOK_CALLBACK_TIMEOUT_SECONDS."""

    reason = Reason.CALLBACK_TIMEOUT


class ForwardError(ReceiverError):
    """The user's app did not accept a forwarded delivery (the dispatcher retries it)."""

    reason = Reason.FORWARD_FAILED


class RecoveryDisabledError(ReceiverError):
    """No fal key is configured: set FALHOOK_FAL_KEY (or FAL_KEY) to submit, expect and recover."""

    reason = Reason.RECOVERY_DISABLED


class InvalidRequestError(ReceiverError):
    """An endpoint id, request id or queue URL that falhook cannot use."""

    reason = Reason.INVALID_REQUEST


class QueueFailure(StrEnum):
    """Why a call to fal's queue failed; also the reason a failed expectation shows."""

    UNAUTHORIZED = "unauthorized"  # 401: the key is wrong
    FORBIDDEN = "forbidden"  # 403: the key may not do this
    NOT_FOUND = "not_found"  # 404 on status: fal does not know this request (or endpoint)
    RESULT_GONE = "result_gone"  # the result is no longer stored (fal's retention passed)
    RATE_LIMITED = "rate_limited"  # 429: back off (Retry-After)
    TRY_AGAIN = "try_again"  # 408, 409, 425: HTTP's own "send it again later"
    SERVER_ERROR = "server_error"  # 5xx: fal's side, try again later
    UNREACHABLE = "unreachable"  # connection refused, timeout, DNS
    BAD_ANSWER = "bad_answer"  # an answer we cannot read (not JSON, no request_id…)
    REJECTED = "rejected"  # another 4xx (e.g. 422 on submit: invalid input)
    RESULT_TOO_LARGE = "result_too_large"  # an answer over FALHOOK_MAX_BODY_BYTES

    @property
    def transient(self) -> bool:
        """Worth trying again later (the rest end an expectation as failed)."""
        return self in (
            QueueFailure.RATE_LIMITED,
            QueueFailure.TRY_AGAIN,
            QueueFailure.SERVER_ERROR,
            QueueFailure.UNREACHABLE,
            QueueFailure.BAD_ANSWER,
        )

    @property
    def everyones(self) -> bool:
        """Says something about fal's queue, not one request: every poll of the process
        waits (a rate limit is per key; an outage is everyone's)."""
        return self in (
            QueueFailure.RATE_LIMITED,
            QueueFailure.SERVER_ERROR,
            QueueFailure.UNREACHABLE,
        )


class QueueError(ReceiverError):
    """fal's queue refused a call or could not be reached; `failure` says how."""

    reason = Reason.QUEUE_ERROR

    def __init__(
        self,
        failure: QueueFailure,
        message: str,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
        body: object = None,
    ) -> None:
        super().__init__(message)
        self.failure = failure
        self.status_code = status_code
        self.retry_after = retry_after
        self.body = body
