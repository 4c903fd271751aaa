"""The documentation site builds strictly, and its reference pages name everything the code
has: every setting, every command, every metric (they are generated, so they cannot drift)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from falhook.receiver.cli.main import build_parser
from falhook.receiver.metrics import Metrics
from falhook.receiver.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def _page(site: Path, name: str) -> str:
    return (site / name / "index.html").read_text()


def test_every_setting_is_in_the_reference(site: Path) -> None:
    page = _page(site, "reference/settings")
    for env, _, _ in Settings.env_table():
        assert f"<code>{env}</code>" in page, env


def test_every_command_is_in_the_reference(site: Path) -> None:
    page = _page(site, "reference/cli")
    progs: list[str] = []

    def walk(parser: argparse.ArgumentParser) -> None:
        progs.append(parser.prog)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in dict.fromkeys(action.choices.values()):  # aliases once
                    walk(sub)

    walk(build_parser())
    assert "falhook deliveries replay" in progs
    for prog in progs:
        assert f"<code>{prog}</code>" in page, prog


def test_every_metric_is_in_the_reference(site: Path) -> None:
    page = _page(site, "reference/metrics")
    names = [name for name, _, _, _ in Metrics.reference()]
    assert "falhook_deliveries_received_total" in names
    for name in names:
        assert f"<code>{name}</code>" in page, name


def test_the_python_api_page_documents_the_entry_points(site: Path) -> None:
    page = _page(site, "reference/python")
    for name in ("falhook.verify.verify_signature", "falhook.receiver.WebhookReceiver"):
        assert f'id="{name}"' in page, name
