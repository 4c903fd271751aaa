"""The A/B tool's pure parts: reading variants and summarising rounds."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.ab import Sample, parse_variant, summary
from bench.servers import Server

REPO = Path(__file__).resolve().parents[2]


def test_a_variant_is_a_source_tree_with_optional_settings() -> None:
    plain = parse_variant(f"new={REPO}")
    assert (plain.name, plain.tree, plain.env) == ("new", REPO, {})
    tuned = parse_variant(f"c32={REPO}:FALHOOK_CONCURRENCY=32,FALHOOK_LOG_LEVEL=ERROR")
    assert tuned.env == {"FALHOOK_CONCURRENCY": "32", "FALHOOK_LOG_LEVEL": "ERROR"}


@pytest.mark.parametrize("text", ["new", "=.", "new=", "x=/nonexistent/tree", f"x={REPO}:NOEQ"])
def test_malformed_variants_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_variant(text)


def test_summary_is_the_median_of_valid_rounds() -> None:
    samples = [
        Sample(rps=100.0, p99_ms=9.0, cpu_us=200.0, done_at_end=1.0, problems=()),
        Sample(rps=300.0, p99_ms=30.0, cpu_us=150.0, done_at_end=0.5, problems=()),
        Sample(rps=200.0, p99_ms=10.0, cpu_us=180.0, done_at_end=1.0, problems=()),
    ]
    line = summary("new", samples)
    assert "median      200 req/s" in line
    assert "p99   10.0 ms" in line
    assert "cpu/req  180.0 us" in line
    assert "dispatched at end 50%" in line  # the worst round
    assert "no valid rounds" in summary("bad", [])


def test_a_variant_server_imports_falhook_from_its_own_tree(tmp_path: Path) -> None:
    """The variant's tree, not this checkout, provides falhook (both working directory and
    PYTHONPATH put this checkout first once, so every variant ran the same code)."""
    tree = tmp_path / "tree"
    (tree / "falhook").mkdir(parents=True)
    (tree / "falhook" / "__init__.py").write_text("")
    server = Server(
        "variant", [], 0, {"PYTHONPATH": f"{tree}{os.pathsep}{REPO}"}, tmp_path / "log", cwd=tree
    )
    found = subprocess.run(
        [sys.executable, "-c", "import falhook; print(falhook.__file__)"],
        cwd=server.cwd,
        env=server.environment(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert found == str(tree / "falhook" / "__init__.py")
