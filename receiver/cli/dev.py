"""Developer commands: ``falhook keygen``, ``falhook send`` and ``falhook demo``.

``keygen`` writes a development key pair and its JWKS; ``serve`` verifies with the JWKS
file (``FALHOOK_JWKS_URL=./jwks.json``) and ``send`` signs with the key, exactly as fal
does — so the whole loop runs offline.

Exit codes: 0 success (``send``: a 2xx answer); 1 ``send`` got no 2xx in the end, or
the demo failed; 2 bad arguments (an existing key without --force, an unreadable file).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from falhook.receiver.cli._inputs import MAX_SMALL_INPUT_BYTES, read_input, read_json
from falhook.receiver.cli.common import CommandError, positive_int
from falhook.receiver.retry import doubling

if TYPE_CHECKING:
    from falhook.verify.testing import KeyPair

__all__ = [
    "DEFAULT_USER_ID",
    "JWKS_FILE",
    "KEY_FILE",
    "SendResult",
    "add_parser",
    "backoff_delay",
    "send_once",
]

KEY_FILE = "falhook-key.json"
JWKS_FILE = "jwks.json"
DEFAULT_USER_ID = "dev-user"
FAL_TIMEOUT_SECONDS = 15.0  # fal's first delivery attempt times out after 15 s
BACKOFF_CAP_SECONDS = 600.0
_ERROR_PAYLOAD = {
    "detail": [{"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"}]
}


def _seconds(text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be zero or more seconds")
    return number


def add_parser(subparsers: Any) -> None:
    """Add ``keygen``, ``send`` and ``demo`` to the ``falhook`` parser."""
    keygen = subparsers.add_parser(
        "keygen",
        help="write a development key pair and its JWKS",
        description=(
            f"Write {KEY_FILE} (a private signing key, for `falhook send`) and {JWKS_FILE} "
            "(its public half, for `falhook serve` via FALHOOK_JWKS_URL). For development "
            "and tests only: real deliveries are verified with fal's published keys."
        ),
    )
    keygen.add_argument("--out", default=".", metavar="DIR", help="directory to write to (.)")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key")
    keygen.set_defaults(func=run_keygen)

    send = subparsers.add_parser(
        "send",
        help="sign and POST a delivery exactly as fal does",
        description=(
            "Sign a fal-shaped delivery with a development key and POST it. Redirects are "
            "not followed: like fal, a 3xx counts as a permanent failure. Exit 0 on a 2xx."
        ),
    )
    send.add_argument("url", metavar="URL", help="e.g. http://127.0.0.1:8000/webhooks/fal")
    send.add_argument("--status", choices=["OK", "ERROR"], default="OK", help="(OK)")
    send.add_argument(
        "--payload", metavar="FILE", help="a JSON file for the payload (default: a sample)"
    )
    send.add_argument(
        "--error",
        metavar="TEXT",
        help='the error message of an ERROR delivery (default "Invalid status code: 422")',
    )
    send.add_argument("--request-id", metavar="ID", help="default: a fresh UUID")
    send.add_argument(
        "--user-id", default=DEFAULT_USER_ID, metavar="ID", help=f"({DEFAULT_USER_ID})"
    )
    send.add_argument(
        "--key", default=KEY_FILE, metavar="FILE", help=f"key from `falhook keygen` ({KEY_FILE})"
    )
    send.add_argument(
        "--retry-like-fal",
        action="store_true",
        help="retry failures (non-2xx but 3xx, connection errors, timeouts) with backoff, "
        "re-signing each attempt with a fresh timestamp",
    )
    send.add_argument(
        "--max-attempts", type=positive_int, default=10, metavar="N", help="attempts in all (10)"
    )
    send.add_argument(
        "--backoff",
        type=_seconds,
        default=1.0,
        metavar="SECONDS",
        help=f"first retry delay; doubles each time, capped at {BACKOFF_CAP_SECONDS:g} s (1)",
    )
    send.add_argument(
        "--timeout",
        type=_seconds,
        default=FAL_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help=f"per attempt, like fal ({FAL_TIMEOUT_SECONDS:g})",
    )
    send.set_defaults(func=run_send)

    demo = subparsers.add_parser(
        "demo",
        help="see falhook work end to end, offline, in a few seconds",
        description=(
            "Start a receiver on a free loopback port with a temporary SQLite store and a "
            "fresh key, send it genuine, duplicate and forged deliveries, and show what "
            "the callbacks received and what was rejected, and why."
        ),
    )
    demo.add_argument(
        "--timeout",
        type=_seconds,
        default=20.0,
        metavar="SECONDS",
        help="give up if the callbacks have not run by then (20)",
    )
    demo.set_defaults(func=run_demo)


# -- keygen ----------------------------------------------------------------------------


def run_keygen(args: argparse.Namespace) -> int:
    """``falhook keygen [--out DIR] [--force]``."""
    out = Path(args.out)
    from falhook.verify.testing import generate_keypair, jwks_document  # PyNaCl: import late

    key_path, jwks_path = out / KEY_FILE, out / JWKS_FILE
    if key_path.exists() and not args.force:
        raise CommandError(
            f"{key_path} exists; add --force to replace it (deliveries signed with the old "
            "key will stop verifying)"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        keypair = generate_keypair()
        keypair.save(key_path)
        jwks_path.write_text(json.dumps(jwks_document(keypair), indent=2) + "\n", "utf-8")
    except OSError as exc:
        raise CommandError(f"cannot write to {out}: {exc.strerror or exc}") from exc
    key_abs, jwks_abs = key_path.resolve(), jwks_path.resolve()
    sys.stdout.write(
        f"wrote {key_abs}  (private: signs test deliveries; keep it out of git)\n"
        f"wrote {jwks_abs}  (public: the receiver verifies with it)\n"
        "\n"
        "Receive and send with no network:\n"
        f"  FALHOOK_JWKS_URL={jwks_abs} falhook serve --callback yourapp:handle\n"
        f"  falhook send http://127.0.0.1:8000/webhooks/fal --key {key_abs}\n"
        "\n"
        "In tests: falhook.verify.testing.KeyPair.load(path) signs with the same key.\n"
    )
    return 0


# -- send ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendResult:
    """One attempt: an HTTP answer, or why there was none."""

    status: int | None
    body: str
    error: str | None = None
    location: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def redirect(self) -> bool:
        return self.status is not None and 300 <= self.status < 400

    @property
    def retryable(self) -> bool:
        """What fal retries: anything but a 2xx or a 3xx, including no answer at all."""
        return not self.ok and not self.redirect

    def describe(self) -> str:
        if self.status is None:
            return f"no answer: {self.error}"
        return f"{self.status} {self.body}".rstrip()


def send_once(
    client: Any,
    url: str,
    body: bytes,
    *,
    request_id: str,
    user_id: str,
    keypair: KeyPair,
    timestamp: int | None = None,
) -> SendResult:
    """Sign `body` now (fresh timestamp, as each fal attempt is) and POST it once."""
    import httpx

    from falhook.verify.testing import sign

    headers = sign(body, request_id, user_id, timestamp, keypair=keypair)
    headers["content-type"] = "application/json"
    try:
        response = client.post(url, content=body, headers=headers)
    except httpx.TimeoutException:
        return SendResult(None, "", error="timed out")
    except httpx.HTTPError as exc:
        return SendResult(None, "", error=f"{type(exc).__name__}: {exc}")
    return SendResult(
        response.status_code, response.text, location=response.headers.get("location")
    )


def backoff_delay(attempt: int, base: float, cap: float = BACKOFF_CAP_SECONDS) -> float:
    """Seconds to wait after failed attempt `attempt` (1-based): base, 2·base, 4·base… capped."""
    return doubling(attempt, base, cap)


def _build_body(args: argparse.Namespace, request_id: str) -> bytes:
    from falhook.verify.testing import fal_body

    payload: Any
    if args.payload is not None:
        payload = read_json(args.payload, "--payload")
    elif args.status == "ERROR":
        payload = _ERROR_PAYLOAD
    else:
        return fal_body(request_id)  # the sample payload, shaped like a real delivery
    error = None
    if args.status == "ERROR":
        error = args.error or "Invalid status code: 422"
    return fal_body(request_id, status=args.status, payload=payload, error=error)


def run_send(args: argparse.Namespace) -> int:
    """``falhook send URL …``: exit 0 on a 2xx, 1 otherwise."""
    import httpx

    from falhook.verify.testing import KeyPair

    if not args.url.startswith(("http://", "https://")):
        raise CommandError(f"URL must start with http:// or https://, not {args.url!r}")
    key_path = Path(args.key)
    if not key_path.is_file():
        raise CommandError(f"no key file {key_path}: run `falhook keygen` first, or pass --key")
    key_text = read_input(args.key, "--key", limit=MAX_SMALL_INPUT_BYTES)
    try:
        keypair = KeyPair.loads(key_text, name=args.key)
    except ValueError as exc:
        raise CommandError(str(exc)) from exc
    request_id = args.request_id or str(uuid.uuid4())
    body = _build_body(args, request_id)
    attempts = args.max_attempts if args.retry_like_fal else 1
    out = sys.stdout
    out.write(f"POST {args.url}  request_id={request_id} status={args.status}\n")
    with httpx.Client(timeout=args.timeout, follow_redirects=False) as client:
        for attempt in range(1, attempts + 1):
            result = send_once(
                client, args.url, body, request_id=request_id, user_id=args.user_id, keypair=keypair
            )
            prefix = f"attempt {attempt}: " if args.retry_like_fal else ""
            out.write(f"{prefix}{result.describe()}\n")
            if result.ok:
                return 0
            if result.redirect:
                where = f" to {result.location}" if result.location else ""
                out.write(
                    f"redirected{where}: fal does not follow redirects and counts a 3xx as a "
                    "permanent failure — point the webhook URL at the final address\n"
                )
                return 1
            if attempt < attempts:
                delay = backoff_delay(attempt, args.backoff)
                out.write(f"retrying in {delay:g} s\n")
                out.flush()
                time.sleep(delay)
    if args.retry_like_fal:
        out.write(f"gave up after {attempts} attempts\n")
    return 1


# -- demo ------------------------------------------------------------------------------


def run_demo(args: argparse.Namespace) -> int:
    """``falhook demo``."""
    from falhook.receiver.demo import run

    return run(timeout=args.timeout)
