"""The `falhook` command line.

Each subcommand lives in its own module of this package that exposes
``add_parser(subparsers)``; the parser it adds sets ``func(args) -> int`` as a default.
These modules import only what building their parsers needs: everything heavy (the app,
the store, uvicorn, httpx, PyNaCl) is imported by the command that runs, so ``--help``
and the light commands start fast. Exit codes: see `common.EXIT_CODES_HELP`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from falhook import __version__
from falhook.receiver.cli import dev, dispatch, media, ops, recovery, serve, verify
from falhook.receiver.cli.common import (
    EXIT_CLOSED_OUTPUT,
    EXIT_CODES_HELP,
    CommandError,
    Parser,
)

__all__ = ["build_parser", "main"]

# Subcommand modules, in the order they appear in --help.
_COMMANDS = (serve, ops, media, dispatch, recovery, dev, verify)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="falhook",
        description="Receive fal.ai webhooks durably.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"falhook {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    subparsers.required = True
    for module in _COMMANDS:
        module.add_parser(subparsers)
    return parser


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Parser:
    """The (sub)parser that parsed the command given, e.g. ``deliveries list``'s."""
    current = parser
    for name in (getattr(args, "command", None), getattr(args, "action", None)):
        subparsers = next(
            (a for a in current._actions if isinstance(a, argparse._SubParsersAction)), None
        )
        if subparsers is None or name not in subparsers.choices:
            break
        current = subparsers.choices[name]
    assert isinstance(current, Parser)
    return current


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``falhook`` command line and return its exit code."""
    parser = build_parser()
    # parse_known_args, so that an unknown flag is reported by the subcommand that was
    # meant (with its nearest flag), not by the top-level parser that knows none of them.
    args, extras = parser.parse_known_args(argv)
    if extras:
        _command_parser(parser, args).unrecognized(extras)
    try:
        code: int = args.func(args)
        sys.stdout.flush()  # a reader that went away is noticed here, not at exit
    except CommandError as exc:
        # Named as typed (``falhook deliveries replay: …``), the way argparse names its own.
        prog = _command_parser(parser, args).prog
        print(f"{prog}: {exc}", file=sys.stderr)  # noqa: T201 — CLI output
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `falhook deliveries list | head`: the reader has what it wanted. Stop quietly, as
        # other commands do; stdout goes to /dev/null so the exit's flush cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_CLOSED_OUTPUT
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
