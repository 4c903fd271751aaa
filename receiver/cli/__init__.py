"""The `falhook` command line: one module per group of subcommands."""

from falhook.receiver.cli.common import CommandError, positive_int
from falhook.receiver.cli.main import build_parser, main

__all__ = ["CommandError", "build_parser", "main", "positive_int"]
