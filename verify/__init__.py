"""Verify fal.ai webhook deliveries (Ed25519 signatures, keys from fal's JWKS).

Start with `verify_signature` (or `verify_signature_async`); catch
`WebhookVerificationError` (answer 401) and `KeysUnavailableError` (answer 503).
"""

from falhook.verify.errors import (
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

__version__ = "0.1.0"

__all__ = [
    "AsyncJWKSClient",
    "JWKSClient",
    "KeyCache",
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
