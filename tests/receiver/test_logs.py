"""Structured logs: one JSON object per line, with the record's extra fields, written by a
background thread in order, all of them by the time the pipeline stops."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from falhook.receiver.logs import JsonFormatter, LogPipeline, configure_logging

deliveries = logging.getLogger("falhook.deliveries")


def test_json_line_carries_message_level_and_extras() -> None:
    record = logging.LogRecord(
        "falhook.deliveries", logging.INFO, __file__, 1, "delivery %s", ("accepted",), None
    )
    record.request_id = "r-1"
    record.outcome = "accepted"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["msg"] == "delivery accepted"
    assert data["level"] == "info"
    assert data["logger"] == "falhook.deliveries"
    assert (data["request_id"], data["outcome"]) == ("r-1", "accepted")
    assert data["ts"].endswith("Z")


def test_every_kind_of_value_is_written_as_the_json_module_would() -> None:
    import datetime
    import enum

    class Kind(enum.StrEnum):
        OK = "ok"

    record = logging.LogRecord(
        "falhook.x", 25, __file__, 1, "caf\u00e9 \U0001f600 %d%%", (5,), None
    )
    extras = {
        "text": 'quote " backslash \\ newline \n caf\u00e9 \ud800',
        "count": 3,
        "ratio": 0.25,
        "none": None,
        "yes": True,
        "no": False,
        "nested": {"a": [1, "b", None]},
        "when": datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC),
        "kind": Kind.OK,
        "big": 10**30,
    }
    record.__dict__.update(extras)
    line = JsonFormatter().format(record)
    data = json.loads(line)
    assert data["level"] == "level 25" and data["msg"] == "caf\u00e9 \U0001f600 5%"
    expected = json.loads(json.dumps(extras, default=str))
    assert {key: data[key] for key in extras} == expected
    assert line.isascii() and "\n" not in line


def test_exceptions_are_kept_in_one_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "falhook", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    data = json.loads(JsonFormatter().format(record))
    assert "ValueError: boom" in data["exc"]


@pytest.fixture
def pipeline_to(tmp_path: Path) -> Iterator[Callable[[], tuple[LogPipeline, Path]]]:
    """`configure_logging` into a file; the falhook logger and logging's globals restored."""
    saved = (logging._srcfile, logging.logThreads, logging.logProcesses)
    logger = logging.getLogger("falhook")
    made: list[LogPipeline] = []
    files: list[IO[str]] = []

    def make() -> tuple[LogPipeline, Path]:
        path = tmp_path / "falhook.log"
        files.append(path.open("w"))
        made.append(configure_logging("INFO", files[-1]))
        return made[-1], path

    try:
        yield make
    finally:
        for pipeline in made:
            pipeline.stop()
        for file in files:
            file.close()
        logger.handlers[:] = []
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
        logging._srcfile, logging.logThreads, logging.logProcesses = saved


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_line_is_written_in_order_by_the_time_stop_returns(
    pipeline_to: Callable[[], tuple[LogPipeline, Path]],
) -> None:
    pipeline, path = pipeline_to()
    for i in range(3000):
        deliveries.info("delivery %s", "accepted", extra={"request_id": f"r-{i}", "n": i})
    pipeline.stop()
    lines = _lines(path)
    assert [line["n"] for line in lines] == list(range(3000))
    assert lines[0]["msg"] == "delivery accepted" and lines[0]["request_id"] == "r-0"
    pipeline.stop()  # idempotent


def test_a_routed_library_logger_writes_json_lines_through_the_pipeline(
    pipeline_to: Callable[[], tuple[LogPipeline, Path]],
) -> None:
    pipeline, path = pipeline_to()
    uvicorn_error = logging.getLogger("uvicorn.error")
    saved = logging.getLogger("uvicorn").handlers[:], logging.getLogger("uvicorn").propagate
    pipeline.route("uvicorn")
    try:
        # As uvicorn logs: a coloured copy of the message rides along as an extra.
        uvicorn_error.warning("Invalid HTTP request received.", extra={"color_message": "\x1b[1m"})
        pipeline.stop()
    finally:
        logging.getLogger("uvicorn").handlers[:], logging.getLogger("uvicorn").propagate = saved
    assert _lines(path) == [
        {
            "ts": _lines(path)[0]["ts"],
            "level": "warning",
            "logger": "uvicorn.error",
            "msg": "Invalid HTTP request received.",
        }
    ]


def test_lines_from_several_threads_are_whole_and_each_thread_in_order(
    pipeline_to: Callable[[], tuple[LogPipeline, Path]],
) -> None:
    pipeline, path = pipeline_to()

    def write(name: str) -> None:
        for i in range(500):
            deliveries.info("line", extra={"who": name, "n": i})

    threads = [threading.Thread(target=write, args=(f"t{k}",)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pipeline.stop()
    lines = _lines(path)  # every line parses: none was torn or interleaved
    assert len(lines) == 2000
    for k in range(4):
        assert [line["n"] for line in lines if line["who"] == f"t{k}"] == list(range(500))


def test_lines_are_written_without_waiting_for_stop(
    pipeline_to: Callable[[], tuple[LogPipeline, Path]],
) -> None:
    _, path = pipeline_to()
    deliveries.info("first", extra={"request_id": "r-1"})
    deadline = time.monotonic() + 10
    while not path.read_text().endswith("\n"):  # the writer flushes when the queue runs dry
        assert time.monotonic() < deadline, "the line was not written"
        time.sleep(0.005)
    assert _lines(path)[0]["msg"] == "first"


def test_an_exception_logged_through_the_queue_keeps_its_traceback(
    pipeline_to: Callable[[], tuple[LogPipeline, Path]],
) -> None:
    pipeline, path = pipeline_to()
    try:
        raise KeyError("gone")
    except KeyError:
        logging.getLogger("falhook.receiver").exception("unexpected error handling a delivery")
    logging.getLogger("falhook.receiver").debug("below the level: not written")
    pipeline.stop()
    (line,) = _lines(path)
    assert line["level"] == "error" and "KeyError: 'gone'" in line["exc"]


def test_a_host_app_logger_is_left_alone(
    pipeline_to: Callable[[], tuple[LogPipeline, Path]],
) -> None:
    """Only the falhook logger is configured: other loggers keep their own handlers."""
    other = logging.getLogger("host.app")
    before = list(other.handlers), list(logging.getLogger().handlers)
    pipeline_to()
    assert (list(other.handlers), list(logging.getLogger().handlers)) == before


def test_the_listener_thread_is_named_and_a_line_after_stop_is_written_at_once(
    pipeline_to: Callable[[], tuple[LogPipeline, Path]],
) -> None:
    pipeline, path = pipeline_to()
    deliveries.info("before", extra={"n": 1})
    deadline = time.monotonic() + 10
    while "falhook-logs" not in {thread.name for thread in threading.enumerate()}:
        assert time.monotonic() < deadline, "no falhook-logs thread"
        time.sleep(0.005)
    pipeline.stop()
    assert "falhook-logs" not in {thread.name for thread in threading.enumerate()}
    deliveries.warning("late shutdown message")
    assert [line["msg"] for line in _lines(path)] == ["before", "late shutdown message"]
