"""MkDocs hooks: the reference pages are generated from the code, so they cannot drift.

A page that holds a marker comment gets it replaced at build time:

- ``<!-- falhook:settings -->``: every setting (`Settings.env_table`), its flag and default;
- ``<!-- falhook:cli -->``: every command's ``--help``, from the parser itself;
- ``<!-- falhook:metrics -->``: every metric the receiver can export, from its registry.
"""

from __future__ import annotations

import argparse
import re
from typing import Any

_MARKER = re.compile(r"<!-- falhook:(\w+) -->")


def on_page_markdown(markdown: str, **_: Any) -> str:
    """Replace each marker with the text it stands for."""
    return _MARKER.sub(lambda m: _GENERATORS[m.group(1)](), markdown)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def settings_table() -> str:
    from falhook.receiver.settings import Settings

    rows = ["| variable | flag | default | meaning |", "| --- | --- | --- | --- |"]
    for env, default, help_text in Settings.env_table():
        flag = "--" + env.removeprefix("FALHOOK_").lower().replace("_", "-")
        rows.append(f"| `{env}` | `{flag}` | `{_cell(default)}` | {_cell(help_text)} |")
    return "\n".join(rows)


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    found: list[tuple[str, argparse.ArgumentParser]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name not in [n for n, _ in found]:
                    found.append((name, sub))
    return found


def cli_reference() -> str:
    from falhook.receiver.cli.main import build_parser

    parts: list[str] = []

    def walk(parser: argparse.ArgumentParser, depth: int) -> None:
        heading = "#" * min(depth, 4)
        parts.append(
            f"{heading} `{parser.prog}`\n\n```text\n{parser.format_help().rstrip()}\n```\n"
        )
        for _, sub in _subcommands(parser):
            walk(sub, depth + 1)

    walk(build_parser(), 2)
    return "\n".join(parts)


def metrics_table() -> str:
    from falhook.receiver.metrics import Metrics

    rows = ["| metric | type | labels | meaning |", "| --- | --- | --- | --- |"]
    for name, kind, labels, doc in Metrics.reference():
        shown = ", ".join(f"`{label}`" for label in labels)
        rows.append(f"| `{name}` | {kind} | {shown} | {_cell(doc)} |")
    return "\n".join(rows)


_GENERATORS = {"settings": settings_table, "cli": cli_reference, "metrics": metrics_table}
