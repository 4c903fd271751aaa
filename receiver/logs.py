"""Structured logs: one JSON line per delivery outcome, written off the event loop.

Everything here is plain stdlib ``logging``. A host app that mounts the receiver configures
its own logging and never calls `configure_logging`; ``falhook serve`` calls it once. It
puts a `QueueHandler` on the ``falhook`` logger, so the event loop only builds a record and
appends it to a queue (a few microseconds); a writer thread, woken once per burst rather
than once per record, formats the records in order and writes each burst with one write.
`LogPipeline.stop` drains the queue, so a clean shutdown loses no line.
"""

from __future__ import annotations

import atexit
import json
import logging
import sys
import threading
import time
from json.encoder import encode_basestring_ascii as _quote
from logging.handlers import QueueHandler
from typing import IO, Any

__all__ = ["DeliveryLog", "JsonFormatter", "LogPipeline", "configure_logging", "delivery_log"]


class DeliveryLog:
    """The per-delivery lines (two a delivery), at about half of `Logger.log`'s cost.

    Under `configure_logging` (``falhook serve``: the stock record factory, no caller,
    thread, process or task lookups) a record is a copy of a prepared one with the time,
    message and fields filled in, handed to `Logger.handle`: the same `LogRecord`, the
    same filters and handlers. Under any other logging configuration (a host app that
    mounts the receiver) it is plain `Logger.log`.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._templates: dict[int, dict[str, Any]] = {}

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - logging's own name
        return self.logger.isEnabledFor(level)

    def log(self, level: int, msg: str, arg: object, fields: dict[str, Any]) -> None:
        """``logger.log(level, msg, arg, extra=fields)``."""
        logger = self.logger
        if not logger.isEnabledFor(level):
            return
        if (
            logging.getLogRecordFactory() is not logging.LogRecord
            or logging.logThreads
            or logging.logProcesses
            or logging.logMultiprocessing
            or getattr(logging, "logAsyncioTasks", False)
            or logging._srcfile is not None
        ):
            logger.log(level, msg, arg, extra=fields)
            return
        template = self._templates.get(level)
        if template is None:
            template = self._templates[level] = dict(
                logger.makeRecord(
                    logger.name, level, "(unknown file)", 0, "", (), None, "(unknown function)"
                ).__dict__
            )
        record = logging.LogRecord.__new__(logging.LogRecord)
        attributes = record.__dict__
        attributes.update(template)
        now = time.time()
        attributes["created"] = now
        attributes["msecs"] = int((now - int(now)) * 1000) + 0.0
        attributes["relativeCreated"] = (now - _STARTED) * 1000
        attributes["msg"] = msg
        attributes["args"] = (arg,)
        attributes.update(fields)
        logger.handle(record)


_STARTED: float = getattr(logging, "_startTime", time.time())
delivery_log = DeliveryLog(logging.getLogger("falhook.deliveries"))

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "taskName",  # Python 3.12+
    "color_message",  # uvicorn's own lines carry a copy of the message with ANSI colours
}
# One encoder, built once: json.dumps(default=...) builds a new one on every call.
_ENCODER = json.JSONEncoder(default=str)
# How long the writer waits after the first record of a burst before writing the batch.
_LINGER_SECONDS = 0.02


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON object: time, level, logger, message, and its extras.

    Written out piece by piece rather than built as a dict and encoded whole: strings go
    through the json module's C string encoder, other values through the full encoder.
    Same output, less than half the time, and this runs for every delivery twice.
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
        if record.exc_info:
            parts.append(f', "exc": {_quote(self.formatException(record.exc_info))}')
        elif record.exc_text:
            parts.append(f', "exc": {_quote(record.exc_text)}')
        parts.append("}")
        return "".join(parts)


_LEVELS = {
    logging.DEBUG: '"debug"',
    logging.INFO: '"info"',
    logging.WARNING: '"warning"',
    logging.ERROR: '"error"',
    logging.CRITICAL: '"critical"',
}


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
        # No handler lock: the queue's put is thread-safe on its own.
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
    """Formats records and writes them as whole lines, one write per batch (writer thread)."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__()
        self.stream = stream

    def write_batch(self, records: list[logging.LogRecord]) -> None:
        # The writer thread is this handler's only caller: no lock needed per record.
        lines = []
        for record in records:
            try:
                lines.append(self.format(record))
            except Exception:
                self.handleError(record)
        if not lines:
            return
        lines.append("")
        try:
            self.stream.write("\n".join(lines))
            self.stream.flush()
        except Exception:  # a closed or full stream: say so once, like logging does
            self.handleError(logging.makeLogRecord({"msg": "cannot write falhook logs"}))

    def emit(self, record: logging.LogRecord) -> None:  # pragma: no cover - write_batch is used
        self.write_batch([record])


class _Batches:
    """The queue between loggers and the writer thread, woken once per batch, not per record.

    `queue.SimpleQueue` (what `QueueListener` reads) wakes the listener for every record,
    and on a busy receiver each wake-up took the GIL away from the event loop: two lines a
    delivery cost the loop more than the rest of logging did (bench/README, "Design
    figures"). Here the first record after the queue ran dry wakes the writer, which then
    lingers a moment so the rest of the burst joins the same batch.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[logging.LogRecord] = []
        self.ready = threading.Event()

    def put_nowait(self, record: logging.LogRecord) -> None:
        with self._lock:  # uncontended almost always: the writer holds it for a swap only
            self._records.append(record)
            if len(self._records) == 1:
                self.ready.set()

    def take(self) -> list[logging.LogRecord]:
        """Every record queued so far, in order; the queue is empty afterwards."""
        with self._lock:
            records, self._records = self._records, []
            self.ready.clear()
        return records


class LogPipeline:
    """The queue between the loggers and the writing thread; `stop` drains it.

    Records are written in the order they were queued (per thread, in the order logged),
    at most `linger` seconds after the first of a burst was logged.
    """

    def __init__(self, stream: IO[str], *, linger: float = _LINGER_SECONDS) -> None:
        self.queue = _Batches()
        self.handler = _EnqueueHandler(self.queue)  # type: ignore[arg-type]  # put_nowait only
        self.writer = _LineWriter(stream)
        self.writer.setFormatter(JsonFormatter())
        self.linger = linger
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def route(self, name: str) -> None:
        """Write another library's logger (uvicorn's) through this pipeline as well: the
        same JSON lines, in the same stream, instead of that library's own format."""
        logger = logging.getLogger(name)
        logger.handlers[:] = [self.handler]
        logger.propagate = False

    def start(self) -> None:
        with self._lock:
            if self._thread is None and not self._stopping.is_set():
                self._thread = threading.Thread(target=self._run, name="falhook-logs", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        batches, stopping = self.queue, self._stopping
        while not stopping.is_set():
            batches.ready.wait()
            stopping.wait(self.linger)  # let the rest of the burst join this batch
            self.writer.write_batch(batches.take())
        self.writer.write_batch(batches.take())

    def stop(self) -> None:
        """Write every record logged so far, then stop the thread (idempotent)."""
        with self._lock:
            thread = self._thread
            if thread is None or self._stopping.is_set():
                return
            self._stopping.set()
            self.queue.ready.set()
            thread.join()
            self.writer.write_batch(self.queue.take())  # logged while the thread finished
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
    if hasattr(logging, "logAsyncioTasks"):  # Python 3.12+
        logging.logAsyncioTasks = False
    pipeline = LogPipeline(stream if stream is not None else sys.stderr)
    logger = logging.getLogger("falhook")
    logger.handlers[:] = [pipeline.handler]
    logger.setLevel(level)
    logger.propagate = False
    pipeline.start()
    atexit.register(pipeline.stop)
    return pipeline
