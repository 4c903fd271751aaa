"""Structured logs: one JSON line per delivery outcome, written off the event loop.

Everything here is plain stdlib ``logging``. A host app that mounts the receiver configures
its own logging and never calls `configure_logging`; ``falhook serve`` calls it once. It
puts a `QueueHandler` on the ``falhook`` logger, so the event loop only builds a record and
appends it to a queue (a few microseconds); a `QueueListener` thread formats the records in
order and writes them in whole-line batches, one write per burst instead of one per line.
`LogPipeline.stop` drains the queue, so a clean shutdown loses no line.
"""

from __future__ import annotations

import atexit
import json
import logging
import queue
import sys
import threading
import time
from logging.handlers import QueueHandler, QueueListener
from typing import IO, Any

__all__ = ["JsonFormatter", "LogPipeline", "configure_logging", "delivery_log"]

delivery_log = logging.getLogger("falhook.deliveries")

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "taskName",  # Python 3.12+
}
# One encoder, built once: json.dumps(default=...) builds a new one on every call.
_ENCODER = json.JSONEncoder(default=str)
_BATCH_LINES = 512  # write at least this often while a burst lasts


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON object: time, level, logger, message, and its extras."""

    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # strftime once a second, not once a line
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        data: dict[str, Any] = {
            "ts": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            data["exc"] = record.exc_text
        return _ENCODER.encode(data)


class _EnqueueHandler(QueueHandler):
    """Hands the record to the listener as it is: formatting happens in the listener thread.

    The stock `QueueHandler.prepare` formats and copies each record on the caller's thread,
    which is the cost this exists to move. falhook's log arguments are immutable values
    (strings, numbers), so rendering them a moment later renders the same text. A traceback
    is rendered here, while its frames are as they were when it was logged.
    """

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.exc_info:
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        return record

    after_stop: logging.Handler | None = None  # writes directly once the listener is gone

    def handle(self, record: logging.LogRecord) -> bool:
        # No handler lock: SimpleQueue.put is thread-safe on its own.
        if not self.filter(record):
            return False
        if self.after_stop is not None:
            return bool(self.after_stop.handle(record))
        try:
            self.queue.put_nowait(self.prepare(record))
        except Exception:
            self.handleError(record)
        return True


_TRACEBACKS = logging.Formatter()


class _LineWriter(logging.Handler):
    """Formats records and writes them in batches of whole lines (listener thread only)."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__()
        self.stream = stream
        self._lines: list[str] = []

    def handle(self, record: logging.LogRecord) -> bool:
        # The listener is this handler's only caller: no lock needed per record.
        try:
            self._lines.append(self.format(record))
        except Exception:
            self.handleError(record)
        if len(self._lines) >= _BATCH_LINES:
            self.flush()
        return True

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - handle() is used
        self.handle(record)

    def flush(self) -> None:
        if not self._lines:
            return
        text = "\n".join(self._lines) + "\n"
        self._lines.clear()
        try:
            self.stream.write(text)
            self.stream.flush()
        except Exception:  # a closed or full stream: say so once, like logging does
            self.handleError(logging.makeLogRecord({"msg": "cannot write falhook logs"}))


class _Listener(QueueListener):
    """Flushes its writer whenever the queue runs dry, so lines never wait for a batch."""

    def __init__(self, records: queue.SimpleQueue[Any], writer: _LineWriter) -> None:
        super().__init__(records, writer)
        self._records = records
        self._writer = writer

    def dequeue(self, block: bool) -> Any:
        try:
            return self._records.get_nowait()
        except queue.Empty:
            self._writer.flush()
            return self._records.get(block)


class LogPipeline:
    """The queue between the event loop and the writing thread; `stop` drains it."""

    def __init__(self, stream: IO[str]) -> None:
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.handler = _EnqueueHandler(self.queue)
        self.writer = _LineWriter(stream)
        self.writer.setFormatter(JsonFormatter())
        self._listener = _Listener(self.queue, self.writer)
        self._lock = threading.Lock()
        self._running = False

    def start(self) -> None:
        with self._lock:
            if not self._running:
                self._listener.start()
                self._running = True

    def stop(self) -> None:
        """Write every record logged so far, then stop the thread (idempotent)."""
        with self._lock:
            if not self._running:
                return
            self._running = False
            self._listener.stop()  # enqueues a sentinel after the last record, then joins
            self.writer.flush()
            # Anything logged from now on (late shutdown messages) is written at once.
            direct = logging.StreamHandler(self.writer.stream)
            direct.setFormatter(self.writer.formatter)
            self.handler.after_stop = direct


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
    pipeline = LogPipeline(stream if stream is not None else sys.stderr)
    logger = logging.getLogger("falhook")
    logger.handlers[:] = [pipeline.handler]
    logger.setLevel(level)
    logger.propagate = False
    pipeline.start()
    atexit.register(pipeline.stop)
    return pipeline
