"""Attempts that read well: a callback's traceback with the user's code first.

A failed attempt records its traceback. Each one used to start with falhook's own frames
(the registry, the thread runner) before the user's; here those are folded into one line,
so what is shown starts where the user's code does. `repeats` finds attempts whose error is
the same as the one before, so a dead delivery shows its traceback once, not ten times.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Sequence
from pathlib import Path

import falhook

__all__ = ["attempt_error", "repeats"]

_MAX_TRACE_CHARS = 8000


def _own_dirs() -> tuple[str, ...]:
    # falhook/receiver and falhook/verify may be symlinks (a development checkout): a frame's
    # file name can be either path, so both count as falhook's.
    package = Path(falhook.__file__).parent
    dirs = {str(package), str(package.resolve())}
    for sub in ("receiver", "verify"):
        dirs.add(str((package / sub).resolve()))
    return tuple(d + os.sep for d in dirs)


_OWN = _own_dirs()


def _fold(stack: traceback.StackSummary) -> tuple[traceback.StackSummary, int]:
    kept = [frame for frame in stack if not frame.filename.startswith(_OWN)]
    return traceback.StackSummary.from_list(kept), len(stack) - len(kept)


def attempt_error(exc: BaseException) -> str:
    """The traceback to record for a failed attempt: falhook's own frames folded into one
    line, truncated from the top (its end names the error and where it was)."""
    te = traceback.TracebackException.from_exception(exc)
    folded = 0
    seen: set[int] = set()
    current: traceback.TracebackException | None = te
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        current.stack, n = _fold(current.stack)
        folded += n
        current = current.__cause__ or current.__context__
    lines = "".join(te.format()).strip().splitlines()
    if folded and lines:
        # Under the heading, not at the end: a traceback's last line names the error, and
        # the one-line summaries (deliveries list, notifications) show that line.
        note = f"  ({folded} frame{'' if folded == 1 else 's'} of falhook's own folded)"
        lines.insert(1, note)
    text = "\n".join(lines)
    if len(text) <= _MAX_TRACE_CHARS:
        return text
    return "… (truncated)\n" + text[-_MAX_TRACE_CHARS:]


def repeats(errors: Sequence[str | None]) -> list[int | None]:
    """For each error, the index of the earlier one it repeats exactly (the first of a run
    of identical errors), else None: ``["a", "a", "b", "a"] -> [None, 0, None, None]``."""
    out: list[int | None] = []
    for i, error in enumerate(errors):
        if i and error and error == errors[i - 1]:
            previous = out[i - 1]
            out.append(i - 1 if previous is None else previous)
        else:
            out.append(None)
    return out
