"""``falhook submit``, ``falhook expect`` and ``falhook expectations list``.

``submit`` sends a request to fal's queue with the webhook URL (FALHOOK_PUBLIC_URL +
/webhooks/fal) and records an expectation; ``expect`` records one for a request submitted
elsewhere. A running ``falhook serve`` with the same store and fal key then recovers from
the queue whatever no webhook brings. Both work beside a running ``falhook serve``.

Exit codes: 0 success; 1 fal's queue refused the request or could not be reached
(``submit``); 2 bad arguments, unreadable input, or no fal key; 3 the store cannot be
used: unreachable, missing, or its schema is not current (one line on stderr).

Like the store commands, ``expect`` records its row through recovery/expect.py on an
`Admin` of its own; ``submit`` adds httpx (`Recovery`, unstarted). Only ``falhook serve``
migrates.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from falhook.receiver.cli._inputs import read_json
from falhook.receiver.cli.common import (
    EXIT_NEGATIVE,
    CommandError,
    add_settings_flags,
    database_url,
    guarded,
    out,
    positive_int,
)
from falhook.receiver.durations import format_time
from falhook.receiver.errors import (
    QueueError,
    ReceiverError,
    SettingsError,
    StoreSchemaError,
    StoreUnavailableError,
)
from falhook.receiver.settings import ENV_PREFIX, Settings
from falhook.receiver.tables import render_table

__all__ = ["EXIT_QUEUE", "add_parser"]

EXIT_QUEUE = EXIT_NEGATIVE  # fal's queue did not take the request
_STATES = ("waiting", "polling", "recovered", "arrived", "failed", "expired")
_NO_KEY = (
    f"no fal key: set {ENV_PREFIX}FAL_KEY (or FAL_KEY), or pass --fal-key, "
    "to submit to and recover from fal's queue"
)
_RECOVERY_FLAGS = {
    "database_url",
    "fal_key",
    "queue_url",
    "public_url",
    "recover_after_seconds",
    "expect_ttl_seconds",
}
_REASON_WIDTH = 60


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive number of seconds")
    return value


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not a header: use 'Name: value'")
    return name.strip(), value.strip()


def add_parser(subparsers: Any) -> None:
    """Add ``submit``, ``expect`` and ``expectations`` to the ``falhook`` parser."""
    submit = subparsers.add_parser(
        "submit",
        help="submit a request to fal's queue and expect its result",
        description=(
            "POST the input to fal's queue with the webhook URL (FALHOOK_PUBLIC_URL + "
            "/webhooks/fal), record an expectation, and print the request id (or fal's "
            "whole answer with --json). A running `falhook serve` with the same store and "
            "fal key fetches the result from the queue if no webhook brings it."
        ),
    )
    submit.add_argument("endpoint_id", metavar="ENDPOINT_ID", help="e.g. fal-ai/flux/dev")
    submit.add_argument(
        "--input",
        required=True,
        metavar="FILE",
        help="the model's input: a JSON file, or - for standard input",
    )
    submit.add_argument("--priority", choices=["normal", "low"], help="fal's queue priority")
    submit.add_argument(
        "--start-timeout",
        type=_seconds,
        metavar="SECONDS",
        help="fal gives up if no runner starts the request within this (X-Fal-Request-Timeout)",
    )
    submit.add_argument("--hint", metavar="TEXT", help="runner routing hint (X-Fal-Runner-Hint)")
    submit.add_argument(
        "--header",
        dest="headers",
        action="append",
        type=_header,
        metavar="'NAME: VALUE'",
        help="an extra header for fal (e.g. 'X-Fal-Store-IO: 0'); repeatable",
    )
    submit.add_argument(
        "--media-expiration",
        type=positive_int,
        metavar="SECONDS",
        help="fal deletes the request's media files this long after it is made "
        "(X-Fal-Object-Lifecycle-Preference; default FALHOOK_FAL_MEDIA_EXPIRATION_SECONDS)",
    )
    submit.add_argument("--json", action="store_true", help="print fal's answer as JSON")
    add_settings_flags(submit, only=_RECOVERY_FLAGS)
    submit.set_defaults(func=run_submit)

    expect = subparsers.add_parser(
        "expect",
        help="expect the result of a request submitted elsewhere",
        description=(
            "Record that a result is expected for REQUEST_ID. If no delivery comes within "
            "FALHOOK_RECOVER_AFTER_SECONDS, a running `falhook serve` with the same store "
            "and fal key polls fal's queue for it."
        ),
    )
    expect.add_argument("request_id", metavar="REQUEST_ID")
    expect.add_argument(
        "--endpoint", required=True, metavar="ENDPOINT_ID", help="e.g. fal-ai/flux/dev"
    )
    expect.add_argument("--status-url", metavar="URL", help="the status_url fal returned")
    expect.add_argument("--response-url", metavar="URL", help="the response_url fal returned")
    expect.add_argument("--json", action="store_true", help="print the expectation as JSON")
    add_settings_flags(expect, only=_RECOVERY_FLAGS)
    expect.set_defaults(func=run_expect)

    expectations = subparsers.add_parser(
        "expectations",
        help="list expected results and their recovery state",
        description="Expected results, newest first: waiting, polling, recovered, arrived, "
        "failed (with the reason) or expired.",
    )
    actions = expectations.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    listing = actions.add_parser(
        "list",
        help="expectations, newest first",
        description="Expectations, newest first, as a table (or JSON with --json).",
    )
    listing.add_argument(
        "--state",
        dest="states",
        action="append",
        choices=_STATES,
        help="only expectations in this state; repeatable",
    )
    listing.add_argument(
        "--limit", type=positive_int, default=100, metavar="N", help="at most N rows (100)"
    )
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    add_settings_flags(listing, only={"database_url"})
    listing.set_defaults(func=run_list)


# -- helpers -----------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> Settings:
    from falhook.receiver.cli.common import settings_from_args

    url = database_url(args)  # the same checks and message as the other store commands
    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        raise CommandError(str(exc)) from exc
    if not settings.recovery_enabled:
        raise CommandError(_NO_KEY)
    from falhook.receiver.store.engine import sqlite_file  # imported late: --help stays fast

    path = sqlite_file(url)
    if path is not None and not path.exists():
        # Like the other store commands: a new file here would hold an expectation no
        # `falhook serve` reads.
        raise StoreUnavailableError(
            f"no database at {path} (start `falhook serve` first, or set --database-url "
            f"or {ENV_PREFIX}DATABASE_URL)"
        )
    return settings


def _recovery(settings: Settings) -> Any:
    from falhook.receiver.recovery.service import Recovery  # imported late: --help stays fast
    from falhook.receiver.store.admin import Admin

    # Checked before fal is asked: a request fal accepted whose expectation cannot be
    # recorded would be one nobody recovers.
    admin = Admin.open(settings.database_url)
    try:
        admin.check_schema()
    finally:
        admin.close()
    return Recovery(settings, migrate=False)  # only `falhook serve` migrates


def expectation_summary(e: Any) -> dict[str, Any]:
    """An expectation for ``--json`` (times ISO 8601 UTC)."""
    active = e.state.active
    return {
        "request_id": e.request_id,
        "endpoint_id": e.endpoint_id,
        "state": e.state.value,
        "reason": e.reason,
        "origin": e.origin,
        "queue_status": e.queue_status,
        "polls": e.polls,
        "created_at": format_time(e.created_at),
        "next_check_at": format_time(e.due_at) if active else None,
        "completed_at": format_time(e.completed_at),
        "finished_at": format_time(e.finished_at),
        "expires_at": format_time(e.expires_at),
        "status_url": e.status_url,
        "response_url": e.response_url,
    }


# -- commands ----------------------------------------------------------------------------


@guarded
def run_submit(args: argparse.Namespace) -> int:
    """``falhook submit``."""
    settings = _settings(args)
    arguments = read_json(args.input, "--input", stdin=True)
    recovery = _recovery(settings)
    try:
        answer = recovery.submit_sync(
            args.endpoint_id,
            arguments,
            priority=args.priority,
            start_timeout=args.start_timeout,
            hint=args.hint,
            headers=dict(args.headers or ()),
            media_expiration=args.media_expiration,
        )
    except QueueError as exc:
        print(f"falhook submit: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_QUEUE
    except (StoreUnavailableError, StoreSchemaError):
        raise  # exit 3 (`guarded`); after fal accepted, the message names the request
    except ReceiverError as exc:
        raise CommandError(str(exc)) from exc
    if args.json:
        out(json.dumps(answer, indent=2))
    else:
        out(answer["request_id"])
        if recovery.webhook_url is None:
            print(  # noqa: T201
                f"falhook submit: note: no {ENV_PREFIX}PUBLIC_URL, so fal sends no webhook; "
                "a running `falhook serve` fetches the result from the queue",
                file=sys.stderr,
            )
    return 0


@guarded
def run_expect(args: argparse.Namespace) -> int:
    """``falhook expect``."""
    # What Recovery.expect_sync runs, without building a Recovery (httpx).
    from falhook.receiver.recovery.expect import new_expectation, record_sync

    settings = _settings(args)
    try:
        expected = new_expectation(
            args.request_id,
            args.endpoint,
            queue_url=settings.queue_url,
            status_url=args.status_url,
            response_url=args.response_url,
        )
        new = record_sync(settings, expected, migrate=False)
    except (StoreUnavailableError, StoreSchemaError):
        raise  # exit 3 (`guarded`)
    except ReceiverError as exc:
        raise CommandError(str(exc)) from exc
    if args.json:
        out(json.dumps({"request_id": args.request_id, "recorded": new}))
    elif new:
        out(f"expecting {args.request_id} ({args.endpoint})")
    else:
        out(f"already expecting {args.request_id}")
    return 0


@guarded
def run_list(args: argparse.Namespace) -> int:
    """``falhook expectations list``."""
    from falhook.receiver.cli.common import open_store
    from falhook.receiver.store.expectations import Expectations, ExpectationState

    states = [ExpectationState(s) for s in args.states or ()]
    with open_store(args) as store:
        found = Expectations(store).list(states=states, limit=args.limit)
    if args.json:
        out(json.dumps([expectation_summary(e) for e in found], indent=2))
        return 0
    if not found:
        out("no expectations match")
        return 0
    rows = [["REQUEST_ID", "ENDPOINT", "STATE", "POLLS", "CREATED (UTC)", "REASON"]]
    for e in found:
        reason = e.reason or "-"
        if len(reason) > _REASON_WIDTH:
            reason = reason[: _REASON_WIDTH - 1] + "…"
        rows.append(
            [
                e.request_id,
                e.endpoint_id,
                e.state.value,
                str(e.polls),
                format_time(e.created_at) or "-",
                reason,
            ]
        )
    out(render_table(rows))
    return 0
