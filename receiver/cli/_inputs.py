"""Reading the files a command is given (a payload, a model input, a captured delivery, a
key), with a size cap: one function for every command, so a file that is too big, endless
(``/dev/zero``), not UTF-8, not JSON or nested too deeply is one line and exit 2 — never a
MemoryError or RecursionError traceback."""

from __future__ import annotations

import json
import sys
from typing import Any

from falhook.receiver.cli.common import CommandError

__all__ = ["MAX_INPUT_BYTES", "MAX_SMALL_INPUT_BYTES", "parse_json", "read_input", "read_json"]

MAX_INPUT_BYTES = 64 * 1024 * 1024  # a payload, a captured body: 4x the receiver's default
MAX_SMALL_INPUT_BYTES = 1024 * 1024  # a headers file, a key, a JWKS
_CHUNK = 1024 * 1024


def _where(flag: str, name: str, stdin: bool) -> str:
    return f"standard input ({flag} -)" if stdin and name == "-" else f"the {flag} file {name}"


def _size(limit: int) -> str:
    return f"{limit // (1024 * 1024)} MiB" if limit >= 1024 * 1024 else f"{limit} bytes"


def read_input(name: str, flag: str, *, limit: int = MAX_INPUT_BYTES, stdin: bool = False) -> bytes:
    """The bytes of the file `name` given as `flag` (``-`` is standard input where `stdin`),
    at most `limit` of them: a longer one is refused before more is read."""
    where = _where(flag, name, stdin)
    chunks: list[bytes] = []
    size = 0
    try:
        if stdin and name == "-":
            stream = sys.stdin.buffer
            close = False
        else:
            stream = open(name, "rb")  # noqa: SIM115  # closed below, stdin never
            close = True
        try:
            while size <= limit:
                chunk = stream.read(min(_CHUNK, limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            if close:
                stream.close()
    except OSError as exc:
        raise CommandError(f"cannot read {where}: {exc.strerror or exc}") from None
    if size > limit:
        raise CommandError(f"{where} is larger than {_size(limit)}, the most falhook reads")
    return b"".join(chunks)


def parse_json(data: bytes | str, where: str) -> Any:
    """`data` as JSON; `where` names it in the one-line error."""
    try:
        return json.loads(data)
    except RecursionError:
        raise CommandError(f"{where} is not usable JSON: nested too deeply") from None
    except UnicodeDecodeError:
        raise CommandError(f"{where} is not UTF-8 text") from None
    except ValueError as exc:
        raise CommandError(f"{where} is not JSON: {exc}") from None


def read_json(name: str, flag: str, *, limit: int = MAX_INPUT_BYTES, stdin: bool = False) -> Any:
    """The JSON document in the file `name` given as `flag` (see `read_input`)."""
    data = read_input(name, flag, limit=limit, stdin=stdin)
    return parse_json(data, _where(flag, name, stdin))
