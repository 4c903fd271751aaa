"""Keys, a JWKS file and unique signed fal-shaped deliveries for the benchmark.

Deliveries are written one per line as ``request_id\\tuser_id\\ttimestamp\\tsignature\\tbody``
for the wrk script (``bench/wrk.py``) to pre-render in its ``init``. JSON never contains a raw
tab or newline (``json.dumps`` escapes control characters), so the format needs no quoting.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from nacl.signing import SigningKey

USER_ID = "bench-user"
TARGET_BODY_BYTES = 2048
_ENVELOPE_FIXED = (
    '{"error": null, "gateway_request_id": "", "payload": , "request_id": "", "status": "OK"}'
)


@dataclass(frozen=True)
class Delivery:
    request_id: str
    user_id: str
    timestamp: str
    signature: str
    body: bytes

    def headers(self) -> dict[str, str]:
        return {
            "Content-Type": "application/json",
            "X-Fal-Webhook-Request-Id": self.request_id,
            "X-Fal-Webhook-User-Id": self.user_id,
            "X-Fal-Webhook-Timestamp": self.timestamp,
            "X-Fal-Webhook-Signature": self.signature,
        }


def new_signing_key() -> SigningKey:
    return SigningKey.generate()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwks_document(key: SigningKey) -> dict[str, list[dict[str, str]]]:
    """fal's JWKS shape: one OKP/Ed25519 key, ``x`` base64url without padding."""
    return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": b64url(bytes(key.verify_key))}]}


def write_jwks(key: SigningKey, path: Path) -> Path:
    path.write_text(json.dumps(jwks_document(key)))
    return path


def signed_message(request_id: str, user_id: str, timestamp: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return f"{request_id}\n{user_id}\n{timestamp}\n{digest}".encode()


def _payload_template(target_bytes: int) -> tuple[str, str]:
    """A fal-looking image result, serialised with sorted keys, split around the seed.

    The filler prompt is sized so the whole body comes out near ``target_bytes``.
    """
    seed_marker = 1234567890123456789  # replaced per delivery; 19 digits like the real ones
    payload: dict[str, object] = {
        "has_nsfw_concepts": [False],
        "images": [
            {
                "content_type": "image/png",
                "file_name": "image.png",
                "file_size": 1824075,
                "height": 1024,
                # BENCH_MEDIA_URL: a loopback origin's file, for measuring the archive.
                "url": os.environ.get(
                    "BENCH_MEDIA_URL", "https://v3.fal.media/files/bench/" + "a" * 40 + ".png"
                ),
                "width": 1024,
            }
        ],
        "prompt": "",
        "seed": seed_marker,
        "timings": {"inference": 1.2345678901234567},
    }
    # Fixed parts of the envelope: two uuid4 strings (36 chars each) plus the keys.
    envelope = len(
        '{"error": null, "gateway_request_id": "", "payload": , "request_id": "", "status": "OK"}'
    )
    bare = len(json.dumps(payload, sort_keys=True))
    filler = max(0, target_bytes - envelope - 72 - bare)
    words = ("a dog on a skateboard, studio light, 35mm, highly detailed, " * 64)[:filler]
    payload["prompt"] = words
    text = json.dumps(payload, sort_keys=True)
    head, tail = text.split(str(seed_marker))
    return head, tail


def iter_deliveries(
    key: SigningKey,
    count: int,
    *,
    user_id: str = USER_ID,
    timestamp: int | None = None,
    body_bytes: int = TARGET_BODY_BYTES,
    rng: random.Random | None = None,
) -> Iterator[Delivery]:
    """``count`` unique deliveries signed as fal signs them, all with one timestamp."""
    rng = rng or random.Random()
    ts = str(int(time.time()) if timestamp is None else timestamp)
    head, tail = _payload_template(body_bytes)
    sign = key.sign
    sha = hashlib.sha256
    for _ in range(count):
        rid = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        seed = rng.getrandbits(64)
        body = (
            f'{{"error": null, "gateway_request_id": "{rid}", "payload": {head}{seed}{tail}, '
            f'"request_id": "{rid}", "status": "OK"}}'
        ).encode()
        message = f"{rid}\n{user_id}\n{ts}\n{sha(body).hexdigest()}".encode()
        yield Delivery(rid, user_id, ts, sign(message).signature.hex(), body)


def write_deliveries(
    key: SigningKey, count: int, path: Path, *, timestamp: int | None = None
) -> Path:
    """Write ``count`` fresh deliveries to ``path`` in the wrk script's line format."""
    with path.open("wb") as out:
        for d in iter_deliveries(key, count, timestamp=timestamp):
            out.write(
                b"\t".join(
                    (
                        d.request_id.encode(),
                        d.user_id.encode(),
                        d.timestamp.encode(),
                        d.signature.encode(),
                        d.body,
                    )
                )
                + b"\n"
            )
    return path


def read_deliveries(path: Path) -> Iterator[Delivery]:
    """Parse a file written by :func:`write_deliveries` (used by tests and the dispatch phase)."""
    with path.open("rb") as f:
        for line in f:
            rid, uid, ts, sig, body = line.rstrip(b"\n").split(b"\t", 4)
            yield Delivery(rid.decode(), uid.decode(), ts.decode(), sig.decode(), body)
