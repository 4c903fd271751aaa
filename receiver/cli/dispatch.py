"""``falhook dispatch pause [--reason TEXT] | resume | status``: the store-wide switch.

Pausing stops every replica on the store from starting callbacks (within a second or
two; at once on PostgreSQL); deliveries are still received, stored and acknowledged, and
running callbacks finish. Runs beside ``falhook serve`` like the other store commands.

Exit codes: 0 success; 2 bad arguments; 3 the store cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from falhook.receiver.cli.common import add_settings_flags, guarded, open_store
from falhook.receiver.durations import format_time

if TYPE_CHECKING:  # the store (SQLAlchemy) is imported only when a command runs
    from falhook.receiver.store.control import DispatchControl

__all__ = ["add_parser", "describe"]

_MAX_REASON = 500


def add_parser(subparsers: Any) -> None:
    """Add ``dispatch`` (pause, resume, status) to the ``falhook`` parser."""
    dispatch = subparsers.add_parser(
        "dispatch",
        help="pause, resume or show callback dispatch for every replica",
        description=(
            "Pause or resume callback dispatch for every replica on the store. While "
            "paused, deliveries are still received, stored and acknowledged; running "
            "callbacks finish; none starts until resumed."
        ),
    )
    actions = dispatch.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    pause = actions.add_parser("pause", help="stop starting callbacks, on every replica")
    pause.add_argument("--reason", metavar="TEXT", help="why (shown by status and the console)")
    resume = actions.add_parser("resume", help="start callbacks again; the backlog drains")
    status = actions.add_parser("status", help="paused or running, since when, and why")
    for parser, run in ((pause, run_pause), (resume, run_resume), (status, run_status)):
        parser.add_argument("--json", action="store_true", help="print a JSON object")
        add_settings_flags(parser, only={"database_url"})
        parser.set_defaults(func=run)


def describe(control: DispatchControl) -> str:
    """One line: ``dispatch paused since … by … (reason: …)`` or ``dispatch running``."""
    since = format_time(control.changed_at) if control.changed_at is not None else None
    if not control.paused:
        return "dispatch running" + (f" (resumed {since} by {control.changed_by})" if since else "")
    text = "dispatch paused"
    if since:
        text += f" since {since} by {control.changed_by or 'unknown'}"
    return text + f" (reason: {control.reason or 'none given'})"


def _document(control: DispatchControl) -> dict[str, Any]:
    return {
        "paused": control.paused,
        "reason": control.reason,
        "changed_at": format_time(control.changed_at) if control.changed_at else None,
        "changed_by": control.changed_by,
    }


def _print(args: argparse.Namespace, control: DispatchControl) -> None:
    text = json.dumps(_document(control)) if args.json else describe(control)
    sys.stdout.write(text + "\n")


@guarded
def run_pause(args: argparse.Namespace) -> int:
    """``falhook dispatch pause [--reason TEXT]``."""
    reason = " ".join((args.reason or "").split())[:_MAX_REASON] or None
    with open_store(args) as store:
        control = store.set_dispatch_paused(True, reason=reason, by="cli")
    _print(args, control)
    return 0


@guarded
def run_resume(args: argparse.Namespace) -> int:
    """``falhook dispatch resume``."""
    with open_store(args) as store:
        control = store.set_dispatch_paused(False, by="cli")
    _print(args, control)
    return 0


@guarded
def run_status(args: argparse.Namespace) -> int:
    """``falhook dispatch status``."""
    with open_store(args) as store:
        control = store.dispatch_control()
    _print(args, control)
    return 0
