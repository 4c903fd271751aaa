"""Every Python and shell snippet of the README and of the docs runs as a user would copy it.

Python snippets each run in a fresh interpreter. Shell snippets run in page order, each
in its own bash, continuing in the directory the previous one ended in (a walkthrough's
``cd`` carries over, as in a terminal); whatever one leaves running in the background is
stopped when it ends. The only changes made to a snippet: the walkthrough's port 8000 is
replaced by a free one (``FALHOOK_PORT`` and the URLs), so the test never collides, and a
``make test`` line is left out: it is this very suite (``.ci/run`` runs it, see
`test_the_test_command_is_what_ci_runs`), and running it from inside itself would recurse.

A snippet is skipped only when its first line says so, visibly, in the page itself:
``# needs: a real fal account …`` or ``# needs: network …``. Each page's shell snippets run
in a directory of their own.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
PAGES = [README, *sorted((REPO_ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SKIP_MARKER = re.compile(r"# needs: (a real fal account|network)\b")
RUN_LANGUAGES = {"python": "python", "sh": "sh", "bash": "sh", "shell": "sh"}


class Snippet(NamedTuple):
    page: Path
    line: int  # where its fence opens in the page
    language: str  # "python" or "sh"
    code: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(REPO_ROOT)} line {self.line}"

    @property
    def skip_reason(self) -> str | None:
        first = self.code.lstrip().splitlines()[0] if self.code.strip() else ""
        found = SKIP_MARKER.match(first)
        return found.group(0) if found else None


def snippets(page: Path = README) -> list[Snippet]:
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        language = RUN_LANGUAGES.get(match.group(1))
        if language is not None:
            line = text.count("\n", 0, match.start()) + 1
            found.append(Snippet(page, line, language, match.group(2)))
    return found


def all_snippets() -> list[Snippet]:
    return [snippet for page in PAGES for snippet in snippets(page)]


def _env(port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALHOOK_")}
    # The falhook of this checkout, as `make demo` or `pip install .` would put it on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FALHOOK_PORT"] = str(port)
    env.pop("PYTHONPATH", None)
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_there_are_snippets_of_both_kinds_and_every_skip_is_marked() -> None:
    found = all_snippets()
    assert {s.language for s in snippets()} == {"python", "sh"}
    for snippet in found:
        first = snippet.code.lstrip().splitlines()[0]
        if first.startswith("# needs:"):
            assert snippet.skip_reason, f"{snippet.where}: unknown marker {first!r}"


PYTHON_SNIPPETS = [s for s in all_snippets() if s.language == "python"]


@pytest.mark.parametrize(
    "snippet",
    PYTHON_SNIPPETS,
    ids=[f"{s.page.relative_to(REPO_ROOT)}:L{s.line}" for s in PYTHON_SNIPPETS],
)
def test_python_snippet_runs(snippet: Snippet, tmp_path: Path) -> None:
    if snippet.skip_reason:
        pytest.skip(f"{snippet.where}: {snippet.skip_reason}")
    result = subprocess.run(
        [sys.executable, "-c", snippet.code],
        cwd=tmp_path,
        env=_env(_free_port()),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"{snippet.where}:\n{result.stderr}"


def _is_make_test(line: str) -> bool:
    return line.split("#")[0].split() == ["make", "test"]


def test_the_readme_starts_with_the_demo_and_the_test_command() -> None:
    first = next(s for s in snippets() if s.language == "sh")
    commands = [line.split("#")[0].strip() for line in first.code.splitlines()]
    assert [c for c in commands if c] == ["make demo", "make test"]


def test_the_test_command_is_what_ci_runs() -> None:
    ci = (REPO_ROOT / ".ci" / "run").read_text().splitlines()
    assert "make test" in [line.strip() for line in ci]


def _run_shell(
    snippet: Snippet, cwd: Path, port: int, cwd_file: Path
) -> subprocess.CompletedProcess[str]:
    code = snippet.code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    code = "\n".join(line for line in code.splitlines() if not _is_make_test(line))
    script = f'set -e\n{code}\npwd > "{cwd_file}"\n'
    # Output to files, not pipes: a server left in the background would hold a pipe open.
    out_path, err_path = cwd_file.with_suffix(".out"), cwd_file.with_suffix(".err")
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=cwd,
            env=_env(port),
            stdout=out,
            stderr=err,
            start_new_session=True,  # its own process group: background jobs stop with it
        )
        try:
            code_ = proc.wait(timeout=100)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
    return subprocess.CompletedProcess(proc.args, code_, out_path.read_text(), err_path.read_text())


# What the walkthrough's comments say its commands print, which the run must print too:
# (text in the snippet, as the README shows it; pattern its output must match, per line).
PROMISED = [
    ("# req-1       dead   OK      3 ", r"^req-1\s+dead\s+OK\s+3\s"),
    ("# replayed req-1 (was dead)", r"^replayed req-1 \(was dead\)$"),
]


SHELL_PAGES = [page for page in PAGES if any(s.language == "sh" for s in snippets(page))]


@pytest.mark.slow
@pytest.mark.parametrize(
    "page", SHELL_PAGES, ids=[str(p.relative_to(REPO_ROOT)) for p in SHELL_PAGES]
)
def test_shell_snippets_run_in_order(page: Path, tmp_path: Path) -> None:
    cwd = tmp_path
    cwd_file = tmp_path / ".cwd"
    ran = promised = 0
    for snippet in (s for s in snippets(page) if s.language == "sh"):
        if snippet.skip_reason:
            continue
        # "From a clone of this repository": `make demo` runs in the clone.
        here = REPO_ROOT if snippet.code.lstrip().startswith("make ") else cwd
        port = _free_port()
        result = _run_shell(snippet, here, port, cwd_file)
        assert result.returncode == 0, (
            f"{snippet.where} exited {result.returncode}:\n"
            f"--- stdout\n{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
        )
        assert "Traceback" not in result.stderr, f"{snippet.where}:\n{result.stderr}"
        for shown, pattern in PROMISED:
            if shown in snippet.code:
                promised += 1
                assert re.search(pattern, result.stdout, re.MULTILINE), (
                    f"{snippet.where} shows {shown[2:].strip()!r}; the run printed:\n"
                    f"{result.stdout[-3000:]}\n--- stderr\n{result.stderr[-3000:]}"
                )
        if here == cwd:
            cwd = Path(cwd_file.read_text().strip())
        ran += 1
    if page == README:
        assert ran >= 2
        assert promised == len(PROMISED), "a promised output is no longer in the README"


def test_make_demo_installs_only_the_runtime_dependencies(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    result = subprocess.run(
        ["make", "-n", "demo", f"VENV={venv}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    installs = [line for line in result.stdout.splitlines() if "pip install" in line]
    assert installs and all("-e ." in line and "[dev" not in line for line in installs)
    assert f"{venv}/bin/falhook demo" in result.stdout


def test_keygen_output_is_ignored_by_git(tmp_path: Path) -> None:
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", "falhook-key.json", "jwks.json"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.stdout.split() == ["falhook-key.json", "jwks.json"]


def test_the_readme_and_docs_speak_to_users() -> None:
    for page in PAGES:
        text = page.read_text()
        assert "../shared" not in text and "shared/" not in text, page
        assert not re.search(r"\bissue\s*#?\d+|#\d+\b", text, re.IGNORECASE), page


def test_the_readme_is_short() -> None:
    assert len(README.read_text().splitlines()) <= 250


def test_every_serve_flag_has_help_and_the_listen_address_is_documented() -> None:
    from falhook.receiver.cli import build_parser

    # Every Settings field is on the generated settings page (tests/test_docs.py); the
    # listen address is read by `falhook serve` alone, so the page states it by hand.
    text = (REPO_ROOT / "docs" / "reference" / "settings.md").read_text()
    for env in ("FALHOOK_HOST", "FALHOOK_PORT"):
        assert f"`{env}`" in text, env
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    pending = list(subcommands.choices.items())  # type: ignore[union-attr]
    while pending:
        name, sub = pending.pop()
        for action in sub._actions:
            if action.__class__.__name__ == "_SubParsersAction":
                pending += [(f"{name} {n}", p) for n, p in action.choices.items()]
            elif action.option_strings and action.dest != "help":
                assert action.help, f"falhook {name} {action.option_strings[0]} has no --help text"
