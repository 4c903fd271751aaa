"""Callbacks for ``falhook serve --callback`` during the benchmark.

``noop`` (``async def``) and ``noop_def`` (a plain ``def``, run off the event loop) are the
throughput runs' callbacks. ``record`` appends one line per delivery, the
seconds from ``received_at`` (stored, just before the acknowledgement) to the callback's
start, to the file named by ``FALHOOK_BENCH_LATENCY_FILE``.
"""

from __future__ import annotations

import os
import time
from typing import IO, Any

LATENCY_FILE_ENV = "FALHOOK_BENCH_LATENCY_FILE"

# Opened on first use and kept for the life of the server process (a benchmark-only global).
_latency_file: IO[str] | None = None


async def noop(delivery: Any) -> None:
    return None


def noop_def(delivery: Any) -> None:
    return None


def _append(line: str) -> None:
    # A few microseconds of local file I/O; done inline so it cannot skew what it measures.
    global _latency_file
    if _latency_file is None:
        _latency_file = open(os.environ[LATENCY_FILE_ENV], "a")  # noqa: SIM115 - kept open
    _latency_file.write(line)
    _latency_file.flush()


async def record(delivery: Any) -> None:
    started = time.time()
    _append(f"{started - delivery.received_at.timestamp():.6f}\n")
