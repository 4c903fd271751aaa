"""bench.archive runs end to end on a small file: both downloads write the whole file."""

from __future__ import annotations

import pytest

from bench import archive


def test_the_archive_bench_compares_both_downloads(capsys: pytest.CaptureFixture[str]) -> None:
    assert archive.main(["--size-mib", "4", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("plain") >= 2 and out.count("falhook ") >= 2
    assert "median: plain" in out and "goal >= 0.8x" in out
