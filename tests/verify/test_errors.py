"""The error tree: reasons, messages and the 401/503 split."""

from __future__ import annotations

from falhook.verify.errors import (
    KeyRefreshPendingError,
    KeysUnavailableError,
    Reason,
    VerifyError,
    WebhookVerificationError,
)


def test_every_reason_has_its_documented_value() -> None:
    """Reason values are the wire strings receivers put in their JSON bodies."""
    assert {r.value for r in Reason} == {
        "missing_header",
        "malformed_header",
        "timestamp_too_old",
        "timestamp_too_new",
        "user_mismatch",
        "invalid_signature",
        "keys_unavailable",
        "key_refresh_pending",
    }


def test_keys_unavailable_is_not_a_verification_error() -> None:
    """A JWKS outage must never be answered as 'unauthorized'."""
    assert issubclass(KeysUnavailableError, VerifyError)
    assert not issubclass(KeysUnavailableError, WebhookVerificationError)


def test_a_pending_refresh_is_a_503_with_its_own_reason() -> None:
    """Caught wherever keys_unavailable is (503, fal retries), told apart by its reason."""
    assert issubclass(KeyRefreshPendingError, KeysUnavailableError)
    assert KeyRefreshPendingError().reason is Reason.KEY_REFRESH_PENDING
    assert KeysUnavailableError().reason is Reason.KEYS_UNAVAILABLE


def test_verification_error_carries_reason_header_and_default_message() -> None:
    """The reason is an enum, the header optional, the message defaults to the reason."""
    exc = WebhookVerificationError("missing_header", header="X-Fal-Webhook-Timestamp")  # type: ignore[arg-type]
    assert exc.reason is Reason.MISSING_HEADER
    assert exc.header == "X-Fal-Webhook-Timestamp"
    assert str(exc) == "missing header"
    assert "missing_header" in repr(exc)


def test_keys_unavailable_default_message_is_its_docstring() -> None:
    """The class docstring is the default message."""
    assert "No verification keys" in str(KeysUnavailableError())


def test_every_error_carries_an_enum_reason() -> None:
    assert KeysUnavailableError().reason is Reason.KEYS_UNAVAILABLE
    assert WebhookVerificationError(Reason.USER_MISMATCH).reason is Reason.USER_MISMATCH
