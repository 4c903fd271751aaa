"""Operator commands: ``falhook deliveries list|show|replay`` and ``falhook prune``.

They read and write the same store as ``falhook serve`` (``--database-url`` or
``FALHOOK_DATABASE_URL``), and may run beside it.

Exit codes: 0 success; 1 a request id that is not stored (``show``, and ``replay`` when
any id is unknown); 2 bad arguments; 3 the store cannot be reached (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from falhook.receiver.cli.common import (
    EXIT_STORE,
    CommandError,
    add_settings_flags,
    database_url,
    guarded,
    open_store,
    out,
    positive_int,
)
from falhook.receiver.durations import format_duration, format_time, parse_duration, parse_since
from falhook.receiver.settings import ENV_PREFIX
from falhook.receiver.state import RETRYING, SHOWN_STATES, State, shown_state
from falhook.receiver.tables import render_table
from falhook.receiver.tracebacks import repeats

if TYPE_CHECKING:
    from falhook.receiver.store.attempts import StoredAttempt
    from falhook.receiver.store.records import StoredDelivery

__all__ = [
    "DEFAULT_RETENTION",
    "EXIT_NOT_FOUND",
    "EXIT_STORE_UNAVAILABLE",
    "MIN_RETENTION_SECONDS",
    "add_parser",
]

EXIT_NOT_FOUND = 1
EXIT_STORE_UNAVAILABLE = EXIT_STORE
# fal retries a failed delivery for up to about 2 hours (or until its stored result
# expires, about 1 hour). While it may still redeliver, the row must exist: it is what
# makes the redelivery a duplicate instead of a second dispatch. 7 days is far past
# that window and keeps a week of history for `show` and `replay`.
DEFAULT_RETENTION = "7d"
MIN_RETENTION_SECONDS = 3 * 3600.0
_LAST_ERROR_WIDTH = 60
_REPLAY_HINT = (
    "a running `falhook serve` dispatches replayed deliveries at its next poll "
    f"({ENV_PREFIX}POLL_SECONDS, default 5 s), or at once on PostgreSQL"
)


# -- argument types (argparse turns ArgumentTypeError into exit 2 with the message) ------


def _since(text: str) -> float:
    try:
        return parse_since(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration(text: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be longer than zero")
    return seconds


# -- parsers ---------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    """Add ``deliveries`` (list, show, replay) and ``prune`` to the ``falhook`` parser."""
    deliveries = subparsers.add_parser(
        "deliveries",
        help="list, show and replay stored deliveries",
        description="Inspect the deliveries in the store, and re-queue finished ones.",
    )
    actions = deliveries.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True

    listing = actions.add_parser(
        "list",
        help="stored deliveries, newest first",
        description="Stored deliveries, newest first, as a table (or JSON with --json).",
    )
    listing.add_argument(
        "--state",
        dest="states",
        action="append",
        choices=SHOWN_STATES,
        help="only deliveries in this state; repeatable (retrying: pending, failed before, "
        "due later)",
    )
    listing.add_argument(
        "--since",
        type=_since,
        metavar="WHEN",
        help="only deliveries received since WHEN: a duration ago (36h, 7d) or ISO 8601 time",
    )
    listing.add_argument(
        "--limit", type=positive_int, default=100, metavar="N", help="at most N rows (100)"
    )
    listing.add_argument("--json", action="store_true", help="print a JSON array")
    add_settings_flags(listing, only={"database_url"})
    listing.set_defaults(func=run_list)

    show = actions.add_parser(
        "show",
        help="one delivery: body, state, attempts, last error",
        description="One stored delivery: its body, state, attempts, times (UTC), last error.",
    )
    show.add_argument("request_id", metavar="REQUEST_ID")
    show.add_argument("--json", action="store_true", help="print a JSON object")
    add_settings_flags(show, only={"database_url"})
    show.set_defaults(func=run_show)

    replay = actions.add_parser(
        "replay",
        help="re-queue done or dead deliveries for dispatch",
        description=(
            "Re-queue finished deliveries so their callbacks run again (attempts start from "
            "zero). Idempotent: a pending or running delivery is left alone. "
            + _REPLAY_HINT[0].upper()
            + _REPLAY_HINT[1:]
            + "."
        ),
    )
    replay.add_argument("request_ids", nargs="*", metavar="REQUEST_ID")
    replay.add_argument(
        "--state",
        dest="states",
        action="append",
        choices=[State.DEAD.value, State.DONE.value],
        help="replay every delivery in this state (instead of naming ids); repeatable",
    )
    replay.add_argument(
        "--since",
        type=_since,
        metavar="WHEN",
        help="with --state: only deliveries received since WHEN (36h, 7d, ISO 8601)",
    )
    replay.add_argument("--json", action="store_true", help="print what was done as JSON")
    add_settings_flags(replay, only={"database_url"})
    replay.set_defaults(func=run_replay)

    prune = subparsers.add_parser(
        "prune",
        help="delete old finished deliveries",
        description=(
            "Delete deliveries that finished (done, or with --state dead) longer ago than "
            f"--older-than (default {DEFAULT_RETENTION}). Pending and running deliveries are "
            "never deleted. Keep them longer than fal's retry window (about 2 h): a pruned "
            "request_id that fal redelivers is accepted and dispatched again. Anything under "
            f"{format_duration(MIN_RETENTION_SECONDS)} is refused without --force."
        ),
    )
    prune.add_argument(
        "--older-than",
        type=_duration,
        default=parse_duration(DEFAULT_RETENTION),
        metavar="DURATION",
        help=f"finished longer ago than this: 90m, 36h, 7d, 2w (default {DEFAULT_RETENTION})",
    )
    prune.add_argument(
        "--state",
        dest="states",
        action="append",
        choices=[State.DONE.value, State.DEAD.value],
        help="prune deliveries in this state; repeatable (default: done only)",
    )
    prune.add_argument(
        "--force",
        action="store_true",
        help=f"allow --older-than under {format_duration(MIN_RETENTION_SECONDS)}",
    )
    prune.add_argument("--json", action="store_true", help="print the result as JSON")
    add_settings_flags(prune, only={"database_url"})
    prune.set_defaults(func=run_prune)


# -- rendering -------------------------------------------------------------------------


def _shown(delivery: StoredDelivery, now: float) -> str:
    return shown_state(delivery.state.value, delivery.attempts, delivery.due_at, now)


def summary(delivery: StoredDelivery) -> dict[str, Any]:
    """A delivery without its body, for ``list --json`` (times ISO 8601 UTC)."""
    pending = delivery.state is State.PENDING
    running = delivery.state is State.RUNNING
    return {
        "request_id": delivery.request_id,
        "state": delivery.state.value,
        "retrying": _shown(delivery, time.time()) == RETRYING,
        "status": delivery.status,
        "attempts": delivery.attempts,
        "received_at": format_time(delivery.received_at),
        "updated_at": format_time(delivery.updated_at),
        "finished_at": format_time(delivery.finished_at),
        "next_attempt_at": format_time(delivery.due_at) if pending else None,
        "lease_expires_at": format_time(delivery.due_at) if running else None,
        "last_error": delivery.last_error,
        "error": delivery.error,
        "payload_error": delivery.payload_error,
        "gateway_request_id": delivery.gateway_request_id,
        "user_id": delivery.user_id,
        "completed_callbacks": list(delivery.completed_callbacks),
        "source": delivery.source,
    }


def _body(delivery: StoredDelivery) -> Any:
    """The stored body as JSON (Python keeps fal's > 2**53 integers exact), else text."""
    try:
        return json.loads(delivery.body)
    except ValueError:
        return delivery.body.decode("utf-8", errors="replace")


def _one_line(text: str | None, width: int) -> str:
    if not text:
        return "-"
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


# -- commands --------------------------------------------------------------------------


@guarded
def run_list(args: argparse.Namespace) -> int:
    """``falhook deliveries list``."""
    wanted = args.states or ()
    states = [State(s) for s in wanted if s != RETRYING]
    now = time.time()
    with open_store(args) as store:
        found = store.list(
            states=states,
            since=args.since,
            limit=args.limit,
            retrying_after=now if RETRYING in wanted else None,
        )
    if args.json:
        out(json.dumps([summary(d) for d in found], indent=2))
        return 0
    if not found:
        out("no deliveries match")
        return 0
    header = ["REQUEST_ID", "STATE", "STATUS", "ATTEMPTS", "NEXT ATTEMPT", "RECEIVED (UTC)"]
    rows = [[*header, "LAST_ERROR"]]
    rows += [
        [
            d.request_id,
            _shown(d, now),
            d.status,
            str(d.attempts),
            (format_time(d.due_at) or "-") if d.state is State.PENDING else "-",
            format_time(d.received_at) or "-",
            _one_line(d.last_error, _LAST_ERROR_WIDTH),
        ]
        for d in found
    ]
    out(render_table(rows))
    if len(found) == args.limit:
        out(f"(first {args.limit}; --limit N shows more)")
    return 0


@guarded
def run_show(args: argparse.Namespace) -> int:
    """``falhook deliveries show REQUEST_ID``."""
    from falhook.receiver.cli.media_view import item_document, media_cells, media_rows

    with open_store(args) as store:
        delivery = store.get(args.request_id)
        attempts = store.attempts(args.request_id) if delivery is not None else []
    if delivery is None:
        print(f"falhook deliveries show: no delivery {args.request_id!r}", file=sys.stderr)  # noqa: T201
        return EXIT_NOT_FOUND
    # The archived files (FALHOOK_ARCHIVE_URL): SQLAlchemy Core on the media table.
    with media_rows(database_url(args)) as rows:
        files = rows.get(args.request_id)
        purge = rows.purge(args.request_id)
    history = [_attempt(a) for a in attempts]
    document = summary(delivery) | {
        "attempt_history": history,
        "media": [item_document(item) for item in files],
        # FALHOOK_FAL_PURGE: fal's copy deleted once every file was archived.
        "fal_purge": None if purge is None else {"state": purge[0], "error": purge[1]},
        "body": _body(delivery),
    }
    if args.json:
        out(json.dumps(document, indent=2))
        return 0
    skip = ("body", "attempt_history", "media", "fal_purge")
    fields = [(k, v) for k, v in document.items() if k not in skip and v not in (None, [])]
    width = max(len(k) for k, _ in fields)
    for key, value in fields:
        text = ", ".join(value) if isinstance(value, list) else str(value)
        out(f"{key.ljust(width)}  {text}")
    _out_attempts(history)
    if files:
        out("files:")
        out(render_table(media_cells([(args.request_id, i) for i in files], with_request=False)))
    if purge is not None:
        out(f"purged at fal: {purge[0]}" + (f" ({purge[1]})" if purge[1] else ""))
    body = document["body"]
    out("body:")
    out(json.dumps(body, indent=2) if not isinstance(body, str) else body)
    return 0


def _attempt(attempt: StoredAttempt) -> dict[str, Any]:
    return {
        "attempt": attempt.attempt,
        "started_at": format_time(attempt.started_at),
        "duration_seconds": round(attempt.duration_seconds, 6),
        "outcome": attempt.outcome,
        "next_attempt_at": format_time(attempt.next_attempt_at),
        "error": attempt.error,
    }


def _last_line(text: str | None) -> str | None:
    lines = [line for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else None


def _out_attempts(history: list[dict[str, Any]]) -> None:
    """The attempts as a table (each error's last line), then the latest traceback."""
    if not history:
        out("attempts: none recorded yet")
        return
    rows = [["ATTEMPT", "STARTED (UTC)", "DURATION", "OUTCOME", "NEXT ATTEMPT", "ERROR"]]
    rows += [
        [
            str(a["attempt"]),
            a["started_at"] or "-",
            f"{a['duration_seconds']:.3f} s",
            a["outcome"],
            a["next_attempt_at"] or "-",
            f"same as attempt {history[same]['attempt']}"
            if same is not None
            else _one_line(_last_line(a["error"]), _LAST_ERROR_WIDTH),
        ]
        for a, same in zip(history, repeats([a["error"] for a in history]), strict=True)
    ]
    out("attempts:")
    out(render_table(rows))
    failed = [a for a in history if a["error"]]
    if failed:
        out(f"traceback of attempt {failed[-1]['attempt']}:")
        out(failed[-1]["error"])


@guarded
def run_replay(args: argparse.Namespace) -> int:
    """``falhook deliveries replay REQUEST_ID… | --state dead [--since WHEN]``."""
    ids = list(dict.fromkeys(args.request_ids))  # once each, in the order given
    if ids and args.states:
        raise CommandError("give request ids or --state, not both")
    if not ids and not args.states:
        raise CommandError("give the request ids to replay, or --state dead")
    if args.since is not None and not args.states:
        raise CommandError("--since goes with --state (it selects which to replay)")
    replayed: list[dict[str, str]] = []
    left_alone: list[dict[str, str]] = []
    not_found: list[str] = []
    with open_store(args) as store:
        if ids:
            previous = store.replay(ids)
            for request_id in ids:
                if request_id in previous:
                    replayed.append({"request_id": request_id, "was": previous[request_id]})
                    continue
                current = store.get(request_id)
                if current is None:
                    not_found.append(request_id)
                else:  # pending or running: already on its way
                    left_alone.append({"request_id": request_id, "state": current.state.value})
        else:
            previous = store.replay(states=[State(s) for s in args.states], since=args.since)
            replayed = [{"request_id": rid, "was": state} for rid, state in previous.items()]
    if args.json:
        document = {"replayed": replayed, "left_alone": left_alone, "not_found": not_found}
        out(json.dumps(document, indent=2))
    else:
        for item in replayed:
            out(f"replayed {item['request_id']} (was {item['was']})")
        for item in left_alone:
            out(f"{item['request_id']}: already {item['state']}, left alone")
        for request_id in not_found:
            out(f"{request_id}: not found")
        if not ids and not replayed:
            since = f" received since {format_time(args.since)}" if args.since else ""
            out(f"nothing to replay: no {' or '.join(args.states)} deliveries{since}")
        if replayed:
            out(_REPLAY_HINT)
    return EXIT_NOT_FOUND if not_found else 0


@guarded
def run_prune(args: argparse.Namespace) -> int:
    """``falhook prune [--older-than DURATION] [--state done|dead]…``."""
    older_than: float = args.older_than
    if older_than < MIN_RETENTION_SECONDS and not args.force:
        raise CommandError(
            f"--older-than {format_duration(older_than)} is under "
            f"{format_duration(MIN_RETENTION_SECONDS)}: fal may still be retrying those "
            "deliveries (for up to about 2 h), and a pruned request_id it redelivers is "
            "dispatched again; add --force if you mean it"
        )
    states = [State(s) for s in dict.fromkeys(args.states or [State.DONE.value])]
    with open_store(args) as store:
        deleted = store.prune(older_than, states=states)
    names = [s.value for s in states]
    if args.json:
        document = {"deleted": deleted, "states": names, "older_than_seconds": older_than}
        out(json.dumps(document))
    else:
        noun = "delivery" if deleted == 1 else "deliveries"
        out(
            f"pruned {deleted} {'/'.join(names)} {noun} that finished more than "
            f"{format_duration(older_than)} ago"
        )
    return 0
