"""What every command shares: the user-error exception, argument types, the parser class."""

from __future__ import annotations

import argparse
import sys

__all__ = ["CommandError", "Parser", "positive_int"]


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


class Parser(argparse.ArgumentParser):
    """argparse with falhook's one-line error format."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse's default prints usage and exits 2 too; keep that, but make the line clear.
        self.print_usage(sys.stderr)
        self.exit(2, f"falhook: error: {message}\n")
