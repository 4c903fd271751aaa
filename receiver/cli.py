"""The `falhook` command line.

Each subcommand lives in its own module (``cli_*.py``) that exposes
``add_parser(subparsers)``; the parser it adds sets ``func(args) -> int`` as a default.
Exit codes: 0 success, 1 a negative verdict (e.g. ``falhook verify`` on a forged
delivery), 2 bad arguments or unusable input — never a traceback for user error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import import_module

__all__ = ["CommandError", "main", "positive_int"]

# Subcommand modules, in the order they appear in --help.
_COMMAND_MODULES = (
    "receiver.cli_serve",
    "receiver.cli_ops",
    "receiver.cli_dev",
    "receiver.cli_verify",
)


class CommandError(Exception):
    """A user error a command reports as one line on stderr with exit code 2."""


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return number


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse's default prints usage and exits 2 too; keep that, but make the line clear.
        self.print_usage(sys.stderr)
        self.exit(2, f"falhook: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="falhook", description="Receive fal.ai webhooks durably.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name in _COMMAND_MODULES:
        try:
            module = import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue  # a command module not written yet
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
