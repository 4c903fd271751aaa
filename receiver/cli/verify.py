"""``falhook verify``: check a captured delivery (headers file + body file) offline.

Exit codes: 0 authentic, 1 not authentic, 2 usage error, 3 cannot decide (keys unavailable,
or a key refresh pending).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from falhook.receiver.cli._inputs import MAX_SMALL_INPUT_BYTES, parse_json, read_input
from falhook.receiver.cli.common import CommandError

__all__ = ["add_parser", "parse_headers_text", "run"]

EXIT_AUTHENTIC = 0
EXIT_NOT_AUTHENTIC = 1
EXIT_KEYS_UNAVAILABLE = 3


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``verify`` subcommand to the ``falhook`` parser."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "verify",
        help="check the signature of a captured delivery",
        description="Verify a fal webhook delivery from a headers file and a body file.",
    )
    parser.add_argument(
        "--headers",
        required=True,
        metavar="FILE",
        help='a JSON object, or "Name: value" lines as copied from a request dump',
    )
    parser.add_argument("--body", required=True, metavar="FILE", help="the raw body, byte for byte")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--jwks-url", metavar="URL", help="fetch keys here (default: fal's)")
    source.add_argument("--keys", metavar="FILE", help="a JWKS file instead of fetching")
    parser.add_argument("--user-id", metavar="ID", help="require this fal user id")
    parser.add_argument(
        "--tolerance", type=float, default=300.0, metavar="S", help="clock tolerance (300)"
    )
    parser.add_argument(
        "--now", type=float, metavar="TS", help="Unix time to check the timestamp against"
    )
    parser.add_argument("--json", action="store_true", help="print the verdict as JSON")
    parser.set_defaults(func=run)
    return parser


def parse_headers_text(text: str, where: str = "the headers file") -> dict[str, str]:
    """Headers from a JSON object or from ``Name: value`` lines.

    Request lines (``POST /path HTTP/1.1``), blank lines and lines without a colon are
    skipped, so a pasted request dump works as is. `where` names the text in errors.
    """
    stripped = text.strip()
    if stripped.startswith("{"):
        document = parse_json(stripped, where)
        if not isinstance(document, dict):
            raise CommandError("headers JSON must be an object")
        return {str(name): str(value) for name, value in document.items()}
    headers: dict[str, str] = {}
    for line in stripped.splitlines():
        name, sep, value = line.partition(":")
        if not sep or not name.strip() or " " in name.strip():
            continue
        headers[name.strip()] = value.strip()
    return headers


def _emit(args: argparse.Namespace, document: dict[str, Any], line: str, *, err: bool) -> None:
    # The verdict is the command's output (stdout); only "cannot decide" goes to stderr.
    stream = sys.stderr if err and not args.json else sys.stdout
    stream.write((json.dumps(document) if args.json else line) + "\n")


def run(args: argparse.Namespace) -> int:
    """Execute ``falhook verify``; returns the exit code."""
    # Imported here, not at the top: `falhook --help` must not load PyNaCl and httpx.
    from falhook.verify import (
        KeysUnavailableError,
        WebhookVerificationError,
        load_keys,
        verify_signature,
    )

    document: dict[str, Any]
    headers_raw = read_input(args.headers, "--headers", limit=MAX_SMALL_INPUT_BYTES)
    body = read_input(args.body, "--body")
    keys_raw = None
    if args.keys is not None:
        keys_raw = read_input(args.keys, "--keys", limit=MAX_SMALL_INPUT_BYTES)
    where = f"the --headers file {args.headers}"
    try:
        headers = parse_headers_text(headers_raw.decode("utf-8"), where)
    except UnicodeDecodeError as exc:
        raise CommandError(f"{where} is not UTF-8: {exc}") from exc
    # The outcome is this command's one line; the JWKS client's own warning about a failed
    # fetch (Python's last-resort handler prints it when nothing is configured) a second.
    logging.getLogger("falhook.verify").addHandler(logging.NullHandler())
    try:
        keys = load_keys(keys_raw) if keys_raw is not None else None
        result = verify_signature(
            body,
            headers,
            jwks_url=args.jwks_url,
            keys=keys,
            user_id=args.user_id,
            tolerance=args.tolerance,
            now=args.now,
        )
    except WebhookVerificationError as exc:
        document = {
            "authentic": False,
            "reason": exc.reason.value,
            "message": str(exc),
        }
        _emit(args, document, f"NOT authentic: {exc.reason.value} — {exc}", err=False)
        return EXIT_NOT_AUTHENTIC
    except KeysUnavailableError as exc:
        document = {
            "authentic": None,
            "reason": exc.reason.value,  # keys_unavailable or key_refresh_pending
            "message": str(exc),
        }
        said = exc.reason.value.replace("_", " ")
        _emit(args, document, f"{said}, cannot decide: {exc}", err=True)
        return EXIT_KEYS_UNAVAILABLE
    except ValueError as exc:  # e.g. a negative --tolerance
        raise CommandError(str(exc)) from exc
    document = {
        "authentic": True,
        "request_id": result.request_id,
        "user_id": result.user_id,
        "timestamp": result.timestamp,
    }
    _emit(
        args,
        document,
        f"authentic: request_id={result.request_id} user_id={result.user_id} "
        f"timestamp={result.timestamp}",
        err=False,
    )
    return EXIT_AUTHENTIC
