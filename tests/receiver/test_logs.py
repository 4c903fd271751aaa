"""Structured logs: one JSON object per line, with the record's extra fields."""

from __future__ import annotations

import json
import logging

from falhook.receiver.logs import JsonFormatter


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
