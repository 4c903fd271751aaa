"""What every command shares: exit codes, the user-error exception, argument types, the
parser, the settings flags, the store a store command opens, and printing."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

from falhook.receiver.errors import SettingsError, StoreSchemaError, StoreUnavailableError
from falhook.receiver.settings import (
    ENV_PREFIX,
    GROUPS,
    Settings,
    shown_default,
    shown_metavar,
)

if TYPE_CHECKING:
    from falhook.receiver.store.admin import Admin

__all__ = [
    "EXIT_CANNOT_LISTEN",
    "EXIT_CLOSED_OUTPUT",
    "EXIT_CODES_HELP",
    "EXIT_NEGATIVE",
    "EXIT_STORE",
    "EXIT_USAGE",
    "CommandError",
    "Parser",
    "add_settings_flags",
    "database_url",
    "guarded",
    "open_store",
    "out",
    "positive_int",
    "settings_from_args",
    "settings_groups",
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


# -- settings flags --------------------------------------------------------------------

# Flags with a shape of their own; every other setting gets a plain --name VALUE flag.
_SPECIAL = {"callbacks", "forward_to"}


def settings_groups(parser: argparse.ArgumentParser) -> dict[str, Any]:
    """One argument group per topic of the settings (listening, store, keys…), in order:
    --help shows each setting's flag under its topic."""
    return {title: parser.add_argument_group(title) for title in GROUPS}


def add_settings_flags(
    parser: argparse.ArgumentParser,
    *,
    only: set[str] | None = None,
    groups: dict[str, Any] | None = None,
) -> None:
    """One flag per setting (``--lease-seconds SECONDS``…); each defaults to its env var.

    With `groups` (`settings_groups`), each flag goes in its setting's topic; a command
    taking a few settings (`only`) lists them with its other options.
    """
    for field in dataclasses.fields(Settings):
        if field.name in _SPECIAL or (only is not None and field.name not in only):
            continue
        flag = "--" + field.name.replace("_", "-")
        env = ENV_PREFIX + field.metadata["env"]
        where: Any = parser
        if groups is not None:
            topic = field.metadata["group"] or "other settings"
            if topic not in groups:
                groups[topic] = parser.add_argument_group(topic)
            where = groups[topic]
        where.add_argument(
            flag,
            dest=field.name,
            metavar=shown_metavar(field),
            help=f"{field.metadata['help']} (env {env}; default {shown_default(field)})",
        )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Env first, then every flag given on the command line (flags win)."""
    overrides: dict[str, Any] = {}
    for field in dataclasses.fields(Settings):
        raw = getattr(args, field.name, None)
        if raw is None:
            continue
        if field.name == "callbacks":
            overrides["callbacks"] = tuple(raw)
        else:
            overrides[field.name] = Settings.parse_value(field.name, raw)
    return Settings.from_env(**overrides)


# -- the store a store command opens -----------------------------------------------------

_URL_ENV = ENV_PREFIX + "DATABASE_URL"


def database_url(args: argparse.Namespace) -> str:
    """The flag, else FALHOOK_DATABASE_URL, else the default — validated like `serve`,
    and named in an error as the user gave it (the flag, or the variable)."""
    raw = getattr(args, "database_url", None)
    try:
        if raw is not None:
            url: str = Settings.parse_value("database_url", raw)
            return url
        return Settings.from_env(
            {k: v for k, v in os.environ.items() if k == _URL_ENV}
        ).database_url
    except SettingsError as exc:
        raise CommandError(str(exc)) from exc


@contextmanager
def open_store(args: argparse.Namespace) -> Iterator[Admin]:
    """The store named by the arguments; StoreUnavailableError if it cannot be opened.

    A SQLite file that does not exist is an error, not an empty store: creating one
    would hide a wrong --database-url behind "no deliveries". Nor is a schema created or
    upgraded here: only `falhook serve` migrates, so a store command run against the wrong
    database, or beside an older receiver, changes nothing and says so.

    An `Admin` (an engine of its own), not a `Store`: no writer to start, no migration.
    """
    # imported late: keeps `falhook --help` fast
    from falhook.receiver.store.admin import Admin
    from falhook.receiver.store.engine import sqlite_file

    url = database_url(args)
    path = sqlite_file(url)
    if path is not None and not path.exists():
        raise StoreUnavailableError(
            f"no database at {path} (set --database-url or {ENV_PREFIX}DATABASE_URL)"
        )
    admin = Admin.open(url)
    try:
        admin.check_schema()
        yield admin
    finally:
        admin.close()


def guarded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Report an unreachable store, or one without a current schema, as one line, exit 3."""

    def wrapper(args: argparse.Namespace) -> int:
        name = " ".join(filter(None, [args.command, getattr(args, "action", None)]))
        try:
            return run(args)
        except StoreUnavailableError as exc:
            print(f"falhook {name}: store unavailable: {exc}", file=sys.stderr)  # noqa: T201
        except StoreSchemaError as exc:
            print(f"falhook {name}: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_STORE

    wrapper.__name__ = run.__name__
    wrapper.__doc__ = run.__doc__
    return wrapper


def out(text: str) -> None:
    """Print one line of a command's output."""
    sys.stdout.write(text + "\n")
