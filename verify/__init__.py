"""Verify fal.ai webhook deliveries (Ed25519 signatures, keys from fal's JWKS).

Start with `verify_signature` (or `verify_signature_async`); catch
`WebhookVerificationError` (answer 401) and `KeysUnavailableError` (answer 503; its
`KeyRefreshPendingError` means "retry shortly", not an outage).

The names load on first use (PEP 562): importing one submodule, or `falhook.verify.errors`
alone, does not pull in httpx and PyNaCl.
"""

from importlib import import_module as _import_module
from typing import TYPE_CHECKING as _TYPE_CHECKING

from falhook import __version__

if _TYPE_CHECKING:
    from falhook.verify.errors import (
        KeyRefreshPendingError,
        KeysUnavailableError,
        Reason,
        VerifyError,
        WebhookVerificationError,
    )
    from falhook.verify.jwks import (
        AsyncJWKSClient,
        JWKSClient,
        KeyCache,
        get_async_jwks_client,
        get_jwks_client,
    )
    from falhook.verify.keys import PublicKey, load_keys, parse_jwks
    from falhook.verify.signature import (
        VerifiedWebhook,
        WebhookHeaders,
        check_headers,
        verify_body,
        verify_signature,
        verify_signature_async,
    )

# Public name -> the submodule that defines it.
_EXPORTS = {
    "AsyncJWKSClient": "jwks",
    "JWKSClient": "jwks",
    "KeyCache": "jwks",
    "KeyRefreshPendingError": "errors",
    "KeysUnavailableError": "errors",
    "PublicKey": "keys",
    "Reason": "errors",
    "VerifiedWebhook": "signature",
    "VerifyError": "errors",
    "WebhookHeaders": "signature",
    "WebhookVerificationError": "errors",
    "check_headers": "signature",
    "get_async_jwks_client": "jwks",
    "get_jwks_client": "jwks",
    "load_keys": "keys",
    "parse_jwks": "keys",
    "verify_body": "signature",
    "verify_signature": "signature",
    "verify_signature_async": "signature",
}

__all__ = [
    "AsyncJWKSClient",
    "JWKSClient",
    "KeyCache",
    "KeyRefreshPendingError",
    "KeysUnavailableError",
    "PublicKey",
    "Reason",
    "VerifiedWebhook",
    "VerifyError",
    "WebhookHeaders",
    "WebhookVerificationError",
    "__version__",
    "check_headers",
    "get_async_jwks_client",
    "get_jwks_client",
    "load_keys",
    "parse_jwks",
    "verify_body",
    "verify_signature",
    "verify_signature_async",
]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # found directly next time
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
