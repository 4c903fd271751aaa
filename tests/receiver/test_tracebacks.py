"""tracebacks: falhook's frames folded, repeated errors found."""

from __future__ import annotations

from falhook.receiver.tracebacks import attempt_error, repeats


def test_repeats_points_at_the_first_of_a_run() -> None:
    assert repeats(["a", "a", "a", "b", "a", None, None]) == [None, 0, 0, None, None, None, None]
    assert repeats([]) == []


def test_a_chained_exception_keeps_both_parts() -> None:
    try:
        try:
            raise KeyError("inner")
        except KeyError as exc:
            raise RuntimeError("outer") from exc
    except RuntimeError as exc:
        text = attempt_error(exc)
    assert "KeyError: 'inner'" in text and text.endswith("RuntimeError: outer")
    assert "folded" not in text  # no falhook frame here


def test_a_long_traceback_is_cut_from_the_top() -> None:
    try:
        raise ValueError("x" * 20000)
    except ValueError as exc:
        text = attempt_error(exc)
    assert text.startswith("… (truncated)\n") and text.endswith("x" * 100)
