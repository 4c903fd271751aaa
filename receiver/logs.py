"""Structured logs for ``falhook serve``: one JSON object per line, written off the event loop.

Plain stdlib ``logging``. A host app that mounts the receiver configures its own logging and
never calls `configure_logging`; ``falhook serve`` calls it once. It puts a
`logging.handlers.QueueHandler` on the ``falhook`` logger, so the event loop only builds a
record and queues it; a `logging.handlers.QueueListener` thread formats the records in order
and writes each burst with one write. `LogPipeline.stop` drains the queue, so a clean
shutdown loses no line.
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
import threading
import time
from collections import deque
from json.encoder import encode_basestring_ascii as _quote
from logging.handlers import QueueHandler, QueueListener
from typing import IO, Any

__all__ = ["JsonFormatter", "LogPipeline", "configure_logging"]

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "taskName",  # Python 3.12+
    "color_message",  # uvicorn's own lines carry a copy of the message with ANSI colours
}
_LEVELS = {
    logging.DEBUG: '"debug"',
    logging.INFO: '"info"',
    logging.WARNING: '"warning"',
    logging.ERROR: '"error"',
    logging.CRITICAL: '"critical"',
}
# One encoder, built once: json.dumps(default=...) builds a new one on every call.
_ENCODER = json.JSONEncoder(default=str)
# How long the listener waits after the first record of a burst before taking the burst.
_LINGER_SECONDS = 0.02


class JsonFormatter(logging.Formatter):
    """A record as one JSON object: ts, level, logger, msg, its extra fields, and exc.

    Written piece by piece (strings through the json module's C string encoder) rather than
    as a dict encoded whole: the same text in less than half the time, twice per delivery.
    """

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # strftime once a second, not once a line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        level = _LEVELS.get(record.levelno) or _quote(record.levelname.lower())
        parts = [
            f'{{"ts": "{self._stamp}.{int(record.msecs):03d}Z", "level": {level}, '
            f'"logger": {_quote(record.name)}, "msg": {_quote(record.getMessage())}'
        ]
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key[0] != "_":
                parts.append(f", {_quote(key)}: {_value(value)}")
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            parts.append(f', "exc": {_quote(record.exc_text)}')
        parts.append("}")
        return "".join(parts)


def _value(value: Any) -> str:
    kind = value.__class__
    if kind is str:
        return _quote(value)
    if kind is int:
        return int.__repr__(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    return _ENCODER.encode(value)


class _Bursts:
    """The queue between `QueueHandler` and `QueueListener`, waking the listener once a burst.

    A `queue.SimpleQueue` wakes the listener for every record, and on a busy receiver each
    wake-up took the GIL from the event loop (bench/README, "Design figures"). Here only the
    first record after the queue ran dry wakes it; it then lingers a moment so the rest of
    the burst is taken with it.
    """

    def __init__(self, linger: float) -> None:
        self._lock = threading.Lock()
        self._queued: list[Any] = []
        self._taken: deque[Any] = deque()  # the listener's side: its thread only
        self._ready = threading.Event()
        self._linger = linger

    def put_nowait(self, record: Any) -> None:
        with self._lock:  # uncontended almost always: the listener holds it for a swap only
            self._queued.append(record)
            if len(self._queued) == 1:
                self._ready.set()

    def get(self, block: bool = True) -> Any:
        """The next record, in order (`QueueListener`'s one reader)."""
        if not self._taken:
            threading.current_thread().name = "falhook-logs"  # QueueListener's thread
            self._ready.wait()
            time.sleep(self._linger)
            self._taken.extend(self.take())
        return self._taken.popleft()

    def take(self) -> list[Any]:
        with self._lock:
            records, self._queued = self._queued, []
            self._ready.clear()
        return records

    def empty(self) -> bool:
        """Nothing taken is left to hand out: the end of a burst."""
        return not self._taken


class _Enqueue(QueueHandler):
    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # The stock prepare formats the message and copies the record on the caller's
        # thread (the event loop): the cost this queue exists to move. falhook's log
        # arguments are immutable values, so formatting them a moment later gives the same.
        return record


class _BurstWriter(logging.StreamHandler):  # type: ignore[type-arg]
    """The listener's handler: formats each record, writes a whole burst with one write."""

    def __init__(self, stream: IO[str], queue: _Bursts) -> None:
        super().__init__(stream)
        self.setFormatter(JsonFormatter())
        self._queue = queue
        self._lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record))
        except Exception:
            self.handleError(record)
        if self._queue.empty():
            self.flush()

    def flush(self) -> None:
        if not self._lines:
            return
        text = "\n".join(self._lines) + "\n"
        self._lines.clear()
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # a closed or full stream: say so, like logging does
            self.handleError(logging.makeLogRecord({"msg": "cannot write falhook logs"}))


class LogPipeline:
    """A `QueueHandler` for loggers to use, and the `QueueListener` thread that writes.

    Records are written in the order they were queued (per thread, in the order logged),
    at most ``linger`` seconds after the first of a burst. `stop` writes every record
    queued so far; loggers it serves then write directly.
    """

    def __init__(self, stream: IO[str], *, linger: float = _LINGER_SECONDS) -> None:
        self.queue = _Bursts(linger)
        self.handler = _Enqueue(self.queue)
        self.writer = _BurstWriter(stream, self.queue)
        self._listener = QueueListener(self.queue, self.writer)
        self._loggers: list[logging.Logger] = []
        self._lock = threading.Lock()
        self._state = "new"

    def route(self, name: str) -> None:
        """Write this logger's records (e.g. uvicorn's) through the pipeline: the same JSON
        lines in the same stream, instead of its own handlers and format."""
        logger = logging.getLogger(name)
        logger.handlers[:] = [self.handler]
        logger.propagate = False
        self._loggers.append(logger)

    def start(self) -> None:
        with self._lock:
            if self._state == "new":
                self._state = "running"
                self._listener.start()

    def stop(self) -> None:
        """Write every record logged so far, stop the thread (idempotent)."""
        with self._lock:
            if self._state != "running":
                return
            self._state = "stopped"
            self._listener.stop()
            # Anything logged from now on (late shutdown messages) is written at once.
            direct = logging.StreamHandler(self.writer.stream)
            direct.setFormatter(self.writer.formatter)
            for logger in self._loggers:
                if self.handler in logger.handlers:
                    logger.handlers[:] = [direct]
            for record in self.queue.take():  # logged while the listener stopped
                if record is not None:  # QueueListener's end-of-queue sentinel
                    self.writer.handle(record)
            self.writer.flush()


def configure_logging(level: str = "INFO", stream: IO[str] | None = None) -> LogPipeline:
    """Send falhook's logs to ``stream`` (default stderr) as JSON lines (for `falhook serve`).

    Records are built on the caller's thread and written by a background thread. Call
    ``stop()`` on the result at shutdown (also registered with `atexit`) to write the rest.
    """
    # Each record would otherwise look up the caller's frame, thread and process names,
    # none of which the JSON line shows (logging's documented optimisations). This is
    # process-wide: only `falhook serve`, which owns its process, calls this function.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    if hasattr(logging, "logAsyncioTasks"):  # Python 3.12+
        logging.logAsyncioTasks = False
    pipeline = LogPipeline(stream if stream is not None else sys.stderr)
    pipeline.route("falhook")
    logging.getLogger("falhook").setLevel(level)
    pipeline.start()
    atexit.register(pipeline.stop)
    return pipeline
