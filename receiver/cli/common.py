"""What every command shares: exit codes, the user-error exception, argument types, the parser."""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Sequence
from typing import NoReturn

__all__ = [
    "EXIT_CANNOT_LISTEN",
    "EXIT_CLOSED_OUTPUT",
    "EXIT_CODES_HELP",
    "EXIT_NEGATIVE",
    "EXIT_STORE",
    "EXIT_USAGE",
    "CommandError",
    "Parser",
    "positive_int",
    "suggest",
]

# One table of exit codes for every command: `falhook --help` shows it, the docs include it.
EXIT_NEGATIVE = 1  # a negative answer: not authentic, not found, no 2xx, a demo step missing
EXIT_USAGE = 2  # bad arguments or settings, unusable input (one line on stderr)
EXIT_STORE = 3  # the store cannot be used: unreachable, missing, or its schema is not current
EXIT_CANNOT_LISTEN = 4  # `serve` cannot listen on --host/--port (e.g. the port is in use)
EXIT_CLOSED_OUTPUT = 141  # the output's reader went away (`… | head`): 128 + SIGPIPE, as shells say
EXIT_CODES_HELP = """\
exit codes:
  0    success
  1    a negative answer (verify: not authentic; deliveries show: not found; send: no 2xx)
  2    bad arguments or settings (one line on stderr, never a traceback)
  3    the store cannot be used: unreachable, missing, or its schema is not current
       (verify: keys unavailable)
  4    serve: cannot listen on --host/--port (the port is in use)
  130  interrupted (Ctrl-C)
  141  the output was closed before it was all written (e.g. piped into head)
"""


class CommandError(Exception):
    """A user error a command reports as one line on stderr, with exit code 2 by default."""

    def __init__(self, message: str, *, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return number


def suggest(word: str, candidates: list[str]) -> str | None:
    """The candidate closest to a mistyped `word`, if any is close."""
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return close[0] if close else None


_INVALID_CHOICE = re.compile(r"invalid choice: '([^']*)'")


_REQUIRED = "the following arguments are required: "


class Parser(argparse.ArgumentParser):
    """argparse with falhook's one-line error format, and a suggestion for a typo."""

    _given: list[str] | None = None  # what this (sub)parser was asked to parse

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        # Kept for `error`: argparse reports a missing required flag before the unknown
        # ones, so `--endpont` alone would say only that --endpoint is required.
        self._given = list(args) if args is not None else None
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        hint = f" (see {self.prog} --help)"
        if message.startswith(_REQUIRED) and self._given:
            missing = [m for m in message[len(_REQUIRED) :].split(", ") if m.startswith("-")]
            known = {s for action in self._actions for s in action.option_strings}
            for given in self._given:
                flag = given.split("=", 1)[0]
                close = suggest(flag, missing) if flag.startswith("--") else None
                if flag not in known and close is not None:
                    self._fail(f"{message} — did you mean {close} (not {flag})?")
        # A mistyped subcommand or choice: name the closest one (argparse lists them all).
        found = _INVALID_CHOICE.search(message)
        if found is not None:
            choices = [
                str(choice)
                for action in self._actions
                if isinstance(action.choices, list | dict | tuple)
                for choice in action.choices
            ]
            close = suggest(found.group(1), choices)
            if close is not None:
                hint = f" — did you mean {close}?"
        self._fail(message + hint)

    def unrecognized(self, extras: list[str]) -> NoReturn:
        """Reject arguments this (sub)command does not take, naming its nearest flags."""
        flags = [s for action in self._actions for s in action.option_strings]
        pairs = []
        for extra in extras:
            close = suggest(extra.split("=", 1)[0], flags) if extra.startswith("-") else None
            if close is not None:
                pairs.append((extra, close))
        message = f"unrecognized arguments: {' '.join(extras)}"
        if len(pairs) == 1:
            message += f" — did you mean {pairs[0][1]}?"
        elif pairs:
            message += " — did you mean " + ", ".join(f"{good} for {bad}" for bad, good in pairs)
            message += "?"
        else:
            message += f" (see {self.prog} --help)"
        self._fail(message)

    def _fail(self, message: str) -> NoReturn:
        # One line, named like every other error. argparse's default adds the whole usage
        # (a screenful for `serve`), which buries the one line that matters.
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")
