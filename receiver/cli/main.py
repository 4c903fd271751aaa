"""The `falhook` command line.

Each subcommand lives in its own module of this package that exposes
``add_parser(subparsers)``; the parser it adds sets ``func(args) -> int`` as a default.
Exit codes: 0 success, 1 a negative verdict (e.g. ``falhook verify`` on a forged
delivery), 2 bad arguments or unusable input — never a traceback for user error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from falhook.receiver.cli import dev, ops, serve, verify
from falhook.receiver.cli.common import CommandError, Parser

__all__ = ["build_parser", "main"]

# Subcommand modules, in the order they appear in --help.
_COMMANDS = (serve, ops, dev, verify)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="falhook", description="Receive fal.ai webhooks durably.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    subparsers.required = True
    for module in _COMMANDS:
        module.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``falhook`` command line and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except CommandError as exc:
        print(f"falhook {args.command}: {exc}", file=sys.stderr)  # noqa: T201 — CLI output
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
