"""Sign deliveries exactly as fal does, for your tests (and ours).

    kp = generate_keypair()
    body = fal_body("req-1", payload={"images": []})
    headers = sign(body, "req-1", "user-1", keypair=kp)
    verify_signature(body, headers, keys=kp.public_key)

`JWKSServer` serves a JWKS over loopback HTTP so the real fetching code can be exercised.

Bodies come in two layouts (`fal_body`'s ``layout``), both seen from fal: ``"compact"``
(the default; fal's documented example: fields in fal's order, no spaces, non-ASCII text as
raw UTF-8) and ``"python"`` (what Python's ``json.dumps(..., sort_keys=True)`` writes: the
layout of a delivery captured in 2025). A handler that verifies ``json.dumps(json.loads(body))``
instead of the raw bytes fails on the compact layout, so your tests catch it.

When does ``json.dumps(json.loads(body))`` give other bytes than fal signed, in Python?
Whenever the body is not written as ``json.dumps`` writes with its defaults: other
separators or whitespace (``","``/``":"`` instead of ``", "``/``": "``), non-ASCII text as
raw UTF-8 (``json.dumps`` writes ``\\u00e9``), escapes written otherwise (``\\u00E9``,
``\\/``), numbers written otherwise (``1e3``, ``1.50``: it writes ``1000.0``, ``1.5``),
or a repeated key. Key order is kept by ``json.loads`` and ``json.dumps`` alike, so it
breaks only when you sort (``sort_keys=True``) a body that was not sorted. Integers above
2^53 (fal's seeds) come back exactly in Python; they break JavaScript's ``JSON.parse``,
not Python. So the 2025 capture survives a Python round trip by luck of its layout, and a
compact body does not: verify the raw bytes.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from nacl.signing import SigningKey

from falhook.verify._headers import REQUEST_ID, SIGNATURE, TIMESTAMP, USER_ID
from falhook.verify.keys import PublicKey, b64url_decode, b64url_encode

__all__ = [
    "LAYOUTS",
    "JWKSServer",
    "KeyPair",
    "Layout",
    "fal_body",
    "generate_keypair",
    "jwks_document",
    "sign",
]

_SEED_BYTES = 32


@dataclass(frozen=True)
class KeyPair:
    """An Ed25519 signing key with its public half, as fal would hold it."""

    signing_key: SigningKey
    public_key: PublicKey
    kid: str

    def jwk(self) -> dict[str, str]:
        """The public key as a JWK (unpadded ``x``, like RFC 8037)."""
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": self.public_key.to_base64url(),
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig",
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the seed (base64url) and the JWKS to a JSON file, readable only by you."""
        seed = bytes(self.signing_key)  # PyNaCl's SigningKey bytes are the 32-byte seed
        document = {"seed": b64url_encode(seed), "kid": self.kid, "jwks": jwks_document(self)}
        target = Path(path)
        target.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        target.chmod(0o600)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> KeyPair:
        """Read a file written by `save`; raises ValueError if it is not one."""
        return cls.loads(Path(path).read_bytes(), name=str(path))

    @classmethod
    def loads(cls, text: str | bytes, *, name: str = "key") -> KeyPair:
        """A key pair from the text of a file written by `save` (`name` for errors)."""
        try:
            document = json.loads(text)
            seed_text = document["seed"]
            seed = b64url_decode(seed_text)
            kid = document.get("kid")
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            raise ValueError(f"{name}: not a falhook key file ({exc})") from exc
        return generate_keypair(seed, kid=kid if isinstance(kid, str) else None)


def generate_keypair(seed: bytes | None = None, *, kid: str | None = None) -> KeyPair:
    """A new key pair; a 32-byte ``seed`` makes it deterministic."""
    if seed is None:
        signing_key = SigningKey.generate()
    elif len(seed) != _SEED_BYTES:
        raise ValueError(f"seed must be {_SEED_BYTES} bytes")
    else:
        signing_key = SigningKey(bytes(seed))
    raw = bytes(signing_key.verify_key)
    kid = kid or hashlib.sha256(raw).hexdigest()[:16]
    return KeyPair(signing_key, PublicKey(raw, kid=kid), kid)


def jwks_document(*keypairs: KeyPair) -> dict[str, Any]:
    """A JWKS holding the public keys of ``keypairs``."""
    return {"keys": [kp.jwk() for kp in keypairs]}


def sign(
    body: bytes,
    request_id: str,
    user_id: str,
    timestamp: int | None = None,
    *,
    keypair: KeyPair,
) -> dict[str, str]:
    """The four ``X-Fal-Webhook-*`` headers fal would send with ``body`` (lowercase hex)."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    digest = hashlib.sha256(body).hexdigest()
    message = f"{request_id}\n{user_id}\n{ts}\n{digest}".encode()
    signature = keypair.signing_key.sign(message).signature.hex()
    return {REQUEST_ID: request_id, USER_ID: user_id, TIMESTAMP: ts, SIGNATURE: signature}


_DEFAULT_PAYLOAD: dict[str, Any] = {
    "images": [
        {
            "url": "https://v3.fal.media/files/example/image.png",
            "content_type": "image/png",
            "file_name": "image.png",
            "file_size": 1824075,
            "width": 1024,
            "height": 1024,
        }
    ],
    "seed": 17454220438242315174,  # > 2**53, like the captured delivery
    "has_nsfw_concepts": [False],
    "prompt": "dog",
}


Layout = Literal["compact", "python"]
LAYOUTS: tuple[Layout, ...] = ("compact", "python")
"""Every layout `fal_body` writes: run a handler's test on each to be sure it verifies the
raw bytes (no single re-serialization reproduces both)."""


def fal_body(
    request_id: str,
    *,
    status: str = "OK",
    payload: Any = _DEFAULT_PAYLOAD,
    error: str | None = None,
    payload_error: str | None = None,
    gateway_request_id: str | None = None,
    layout: Layout = "compact",
) -> bytes:
    """A body shaped like a real delivery, in one of fal's layouts.

    ``"compact"`` (default): fields in fal's order (``request_id``, ``gateway_request_id``,
    ``status``, ``payload``, ``error``), no spaces, non-ASCII text as raw UTF-8 — Python's
    ``json.dumps(json.loads(body))`` changes these bytes, so a handler that verifies
    re-serialized JSON fails its tests. ``"python"``: sorted keys, ``", "``/``": "``
    separators, ASCII escapes, exactly as ``json.dumps(..., sort_keys=True)`` writes (a
    delivery captured in 2025); re-serializing with ``json.dumps`` gives it back unchanged,
    so tests on it alone cannot catch that mistake.

    ``"error": null`` is present on OK, as observed; ``payload_error`` only when given.
    """
    document: dict[str, Any] = {
        "request_id": request_id,
        "gateway_request_id": gateway_request_id or request_id,
        "status": status,
        "payload": payload,
        "error": error,
    }
    if payload_error is not None:
        document["payload_error"] = payload_error
    if layout == "compact":
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    if layout == "python":
        return json.dumps(document, sort_keys=True).encode()
    raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")


class JWKSServer:
    """A loopback HTTP server for a JWKS document, in a daemon thread.

    ``set_keys`` rotates, ``fail(503)`` simulates an outage (``fail(None)`` ends it),
    ``requests`` counts GETs. Use as a context manager or call `stop`.
    """

    def __init__(self, *keypairs: KeyPair, path: str = "/.well-known/jwks.json") -> None:
        self._lock = threading.Lock()
        self._body = json.dumps(jwks_document(*keypairs)).encode()
        self._status: int | None = None
        self._path = path
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with server._lock:
                    server.requests += 1
                    status, body = server._status, server._body
                if status is not None:
                    self.send_response(status)
                    body = b'{"error": "simulated outage"}'
                elif self.path.split("?")[0] != server._path:
                    self.send_response(404)
                    body = b"{}"
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self.url = f"http://{host!s}:{port}{path}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="JWKSServer", daemon=True
        )
        self._thread.start()

    def set_keys(self, *keypairs: KeyPair) -> None:
        """Serve these keys from now on (a key rotation)."""
        body = json.dumps(jwks_document(*keypairs)).encode()
        with self._lock:
            self._body = body

    def set_document(self, document: Any) -> None:
        """Serve an arbitrary JSON document (e.g. an invalid JWKS)."""
        body = json.dumps(document).encode()
        with self._lock:
            self._body = body

    def fail(self, status: int | None) -> None:
        """Answer every request with ``status`` (e.g. 503); None serves the keys again."""
        with self._lock:
            self._status = status

    def stop(self) -> None:
        """Shut the server down and release its port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def __enter__(self) -> JWKSServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
