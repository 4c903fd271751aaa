"""Micro-benchmark: warm `verify_signature` against the floor of the raw check.

The floor is what any correct verifier must do: build the message, sha256 the body and
call PyNaCl's ``VerifyKey.verify``. Runs are interleaved and repeated, and the minimum
per-call time of each is kept, so machine noise hits both sides alike.

    python -m bench.verify_micro
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import httpx
from nacl.signing import VerifyKey

from falhook.verify import JWKSClient, verify_signature
from falhook.verify.testing import fal_body, generate_keypair, jwks_document, sign

__all__ = ["run"]

_REQUEST_ID = "5057fca7-6e34-4a4b-a8b5-1a2b3c4d5e6f"
_USER_ID = "github|1234567"


def _time_ns(fn: Callable[[], object], iterations: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(iterations):
        fn()
    return (time.perf_counter_ns() - start) / iterations


def run(iterations: int = 500, repeats: int = 30) -> dict[str, float]:
    """Per-call ns of the floor and of warm verification; ratios are verify / floor.

    Keys: ``floor_ns``, ``verify_ns`` / ``ratio`` (static ``keys=``, ASGI byte headers),
    ``client_ns`` / ``client_ratio`` (warm `JWKSClient.verify`).
    """
    keypair = generate_keypair(b"\x07" * 32)
    body = fal_body(_REQUEST_ID)
    now = int(time.time())
    signed = sign(body, _REQUEST_ID, _USER_ID, now, keypair=keypair)
    # The receiver passes the raw ASGI header list; include a few unrelated headers.
    asgi_headers = [
        (b"host", b"hooks.example.com"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((name.lower().encode(), value.encode()) for name, value in signed.items()),
    ]
    keys = keypair.public_key
    verify_key = VerifyKey(bytes(keypair.public_key))
    sig_hex = signed["X-Fal-Webhook-Signature"]
    ts_text = signed["X-Fal-Webhook-Timestamp"]

    def floor() -> None:
        digest = hashlib.sha256(body).hexdigest()
        message = f"{_REQUEST_ID}\n{_USER_ID}\n{ts_text}\n{digest}".encode()
        verify_key.verify(message, bytes.fromhex(sig_hex))

    def static() -> None:
        verify_signature(body, asgi_headers, keys=keys)

    document = jwks_document(keypair)
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=document))
    client = JWKSClient("https://jwks.invalid/", http_client=httpx.Client(transport=transport))
    client.get_keys()

    def warm_client() -> None:
        client.verify(body, asgi_headers)

    for fn in (floor, static, warm_client):  # warm up caches and the allocator
        _time_ns(fn, iterations // 4 or 1)
    best = {"floor": float("inf"), "static": float("inf"), "client": float("inf")}
    for _ in range(repeats):
        best["floor"] = min(best["floor"], _time_ns(floor, iterations))
        best["static"] = min(best["static"], _time_ns(static, iterations))
        best["client"] = min(best["client"], _time_ns(warm_client, iterations))
    client.close()
    return {
        "floor_ns": best["floor"],
        "verify_ns": best["static"],
        "ratio": best["static"] / best["floor"],
        "client_ns": best["client"],
        "client_ratio": best["client"] / best["floor"],
    }


def main() -> None:
    """Print the numbers."""
    result = run()
    print(f"floor (message + sha256 + VerifyKey.verify): {result['floor_ns']:>10.0f} ns/call")
    print(
        f"verify_signature(keys=...), warm:           {result['verify_ns']:>10.0f} ns/call"
        f"  ratio {result['ratio']:.3f}"
    )
    print(
        f"JWKSClient.verify, warm cache:              {result['client_ns']:>10.0f} ns/call"
        f"  ratio {result['client_ratio']:.3f}"
    )
    print("target ratio <= 1.10")


if __name__ == "__main__":
    main()
