"""``falhook media list [--request-id ID] [--state S] [--json]`` and
``falhook media retry REQUEST_ID``: the archived files of deliveries.

``retry`` puts a delivery's failed and skipped files back to pending and archives them
now, in this process, with the same settings as ``serve`` (FALHOOK_ARCHIVE_URL…).

Exit codes: 0 success (retry: every file archived); 1 no such delivery, or a file still
not archived; 2 bad arguments or settings; 3 the store cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from falhook.receiver.cli.common import (
    EXIT_NEGATIVE,
    CommandError,
    add_settings_flags,
    database_url,
    guarded,
    open_store,
    out,
    positive_int,
    settings_from_args,
)
from falhook.receiver.cli.media_view import item_document, media_cells, media_rows
from falhook.receiver.errors import SettingsError
from falhook.receiver.tables import render_table

if TYPE_CHECKING:  # SQLAlchemy and the archive are imported only when a command runs
    from falhook.receiver.archive import MediaItem

__all__ = ["add_parser"]

_STATES = ("pending", "archived", "failed", "skipped")
_ARCHIVE_FLAGS = {
    "database_url",
    "archive_url",
    "archive_hosts",
    "archive_max_bytes",
    "archive_concurrency",
    "archive_timeout_seconds",
}


def add_parser(subparsers: Any) -> None:
    """Add ``media`` (list, retry) to the ``falhook`` parser."""
    media = subparsers.add_parser(
        "media",
        help="list the archived files of deliveries, retry those that failed",
        description="The media files found in deliveries and where each is archived.",
    )
    actions = media.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    listing = actions.add_parser("list", help="files, newest first")
    listing.add_argument("--request-id", metavar="ID", help="only this delivery's files")
    listing.add_argument(
        "--state", choices=_STATES, help="only files in this state (pending, archived…)"
    )
    listing.add_argument(
        "--limit", type=positive_int, default=100, metavar="N", help="at most N (default 100)"
    )
    listing.add_argument("--json", action="store_true", help="print a JSON list")
    add_settings_flags(listing, only={"database_url"})
    listing.set_defaults(func=run_list)
    retry = actions.add_parser(
        "retry", help="archive a delivery's failed and skipped files again, now"
    )
    retry.add_argument("request_id", metavar="REQUEST_ID")
    retry.add_argument("--json", action="store_true", help="print a JSON list")
    add_settings_flags(retry, only=_ARCHIVE_FLAGS)
    retry.set_defaults(func=run_retry)


@guarded
def run_list(args: argparse.Namespace) -> int:
    """``falhook media list``."""
    from falhook.receiver.archive import MediaState

    state = MediaState(args.state) if args.state else None
    with open_store(args), media_rows(database_url(args)) as rows:
        found = rows.find(request_id=args.request_id, state=state, limit=args.limit)
    if args.json:
        out(json.dumps([item_document(item, rid) for rid, item in found], indent=2))
        return 0
    if not found:
        out("no files match")
        return 0
    out(render_table(media_cells(found)))
    if len(found) == args.limit:
        out(f"(first {args.limit}; --limit N shows more)")
    return 0


@guarded
def run_retry(args: argparse.Namespace) -> int:
    """``falhook media retry REQUEST_ID``."""
    import asyncio

    try:
        settings = settings_from_args(args)
    except SettingsError as exc:
        raise CommandError(str(exc)) from exc
    if settings.archive_url is None:
        raise CommandError("the archive is off: set FALHOOK_ARCHIVE_URL (or --archive-url)")
    with open_store(args) as store:
        stored = store.get(args.request_id)
    if stored is None:
        print(f"falhook media retry: no delivery {args.request_id!r}", file=sys.stderr)  # noqa: T201
        return EXIT_NEGATIVE
    from falhook.receiver.archive import Archiver, MediaState
    from falhook.receiver.models import Delivery

    delivery = Delivery.from_body(
        stored.body, attempt=stored.attempts, received_at=stored.received_at
    )
    with media_rows(settings.database_url) as rows:
        rows.retry(args.request_id)

        async def archive() -> tuple[MediaItem, ...]:
            archiver = Archiver(settings, rows)
            try:
                return (await archiver.archive(delivery, last_attempt=True)).media
            finally:
                await archiver.aclose()

        media = asyncio.run(archive())
    if args.json:
        out(json.dumps([item_document(item, args.request_id) for item in media], indent=2))
    elif not media:
        out(f"no files in {args.request_id}")
    else:
        cells = media_cells([(args.request_id, item) for item in media], with_request=False)
        out(render_table(cells))
    return 0 if all(item.state is MediaState.ARCHIVED for item in media) else EXIT_NEGATIVE
