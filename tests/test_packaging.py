"""The release artifacts, built as a release builds them and used as a user would.

`python -m build` makes the sdist and, from it, the wheel (offline: ``--no-isolation``,
the backend comes from the test environment), in a copy of the sources so no stale
``build/`` folder can slip into it; a wheel built straight from the tree must be the same
file for file, and `twine check` must pass on both. A fresh venv gets the wheel; the
runtime dependencies it declares, and only those, come from the test environment's
site-packages (linked into a folder the venv reads through a path file), so pip checks
the wheel's requirements offline and nothing the dev tools bring can hide a missing one.
From that venv: `falhook demo`, `falhook serve`, the console's files, and a user's own
`verify.py` and `receiver/` beside falhook's packages.
"""

from __future__ import annotations

import email.parser
import hashlib
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import falhook
from falhook.verify.testing import KeyPair, fal_body, generate_keypair, jwks_document, sign
from tests.e2e.server import free_port, wait_for

REPO_ROOT = Path(__file__).resolve().parents[1]
# What the build reads: pyproject's packages and readme, and MANIFEST.in's extra files.
BUILD_INPUTS = (
    "pyproject.toml",
    "MANIFEST.in",
    "README.md",
    "CHANGELOG.md",
    "SECURITY.md",
    "falhook",
    "verify",
    "receiver",
)
USER_ID = "user-packaging"
pytestmark = pytest.mark.slow


def _check(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@dataclass(frozen=True)
class Dists:
    """What the build made."""

    sdist: Path
    wheel: Path  # built from the sdist, as `python -m build` does
    tree_wheel: Path  # built straight from the source tree


def _copy_sources(target: Path) -> Path:
    target.mkdir()
    for name in BUILD_INPUTS:
        path = REPO_ROOT / name
        if path.is_dir():
            # symlinks=True: falhook/verify and falhook/receiver are links to ../verify, ...
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(path, target / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(path, target / name)
    return target


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    root = tmp_path_factory.mktemp("dists")
    build = [sys.executable, "-m", "build", "--no-isolation", "--outdir"]
    # Side by side, each in its own copy (setuptools writes build/ and egg-info there).
    builds = [
        [*build, str(root / "dist"), str(_copy_sources(root / "release"))],
        [*build, str(root / "tree"), "--wheel", str(_copy_sources(root / "source"))],
    ]
    running = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in builds
    ]
    for command, process in zip(builds, running, strict=True):
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, f"{command}\n{output}"
    (sdist,) = (root / "dist").glob("falhook-*.tar.gz")
    (wheel,) = (root / "dist").glob("falhook-*.whl")
    (tree_wheel,) = (root / "tree").glob("falhook-*.whl")
    return Dists(sdist, wheel, tree_wheel)


def _metadata(wheel: Path) -> Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.Parser().parsestr(archive.read(name).decode())


def _runtime_distributions(wheel: Path) -> list[importlib.metadata.Distribution]:
    """The distributions the wheel's requirements need here, with theirs (no extras of
    falhook's own: the postgres driver and the dev tools stay out)."""
    pending = [(Requirement(text), "") for text in _metadata(wheel).get_all("Requires-Dist", [])]
    found: dict[str, importlib.metadata.Distribution] = {}
    done: set[tuple[str, str]] = set()
    while pending:
        requirement, extra = pending.pop()
        if requirement.marker and not requirement.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(requirement.name)
        new = [e for e in ["", *sorted(requirement.extras)] if (name, e) not in done]
        if not new:
            continue
        dist = importlib.metadata.distribution(name)
        assert requirement.specifier.contains(dist.version, prereleases=True), requirement
        found[name] = dist
        for wanted in new:
            done.add((name, wanted))
            pending += [(Requirement(text), wanted) for text in dist.requires or []]
    return list(found.values())


@pytest.fixture(scope="module")
def wheel_env(dists: Dists, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh venv with the built wheel installed and, through a path file, only the
    runtime dependencies it declares; returns its bin directory."""
    root = tmp_path_factory.mktemp("wheel")
    deps = root / "deps"
    deps.mkdir()
    for dist in _runtime_distributions(dists.wheel):
        for file in dist.files or []:
            top = file.parts[0]
            if top != ".." and not (deps / top).exists():  # ".." : scripts in bin/
                (deps / top).symlink_to(Path(str(dist.locate_file(top))))
    env_dir = root / "venv"
    _check([sys.executable, "-m", "venv", "--without-pip", str(env_dir)])
    bin_dir = env_dir / "bin"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    target = _check([str(bin_dir / "python"), "-c", purelib]).strip()
    # The dev environment's own falhook (an editable install) is not among the linked
    # distributions, so only the wheel can provide `falhook` here.
    Path(target, "deps.pth").write_text(f"{deps}\n")
    # No --no-deps: pip checks, offline, that what the wheel requires is there.
    pip = [sys.executable, "-m", "pip", "--python", str(bin_dir / "python")]
    _check([*pip, "install", "-q", "--no-index", str(dists.wheel)])
    yield bin_dir


def _files(wheel: Path) -> dict[str, str]:
    with zipfile.ZipFile(wheel) as archive:
        return {n: hashlib.sha256(archive.read(n)).hexdigest() for n in archive.namelist()}


def test_the_sdist_builds_the_wheel_the_tree_builds(dists: Dists) -> None:
    """File for file and byte for byte: nothing the wheel needs is missing from the sdist."""
    assert _files(dists.wheel) == _files(dists.tree_wheel)
    with tarfile.open(dists.sdist) as archive:
        names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in archive.getnames()}
    assert {"CHANGELOG.md", "SECURITY.md", "README.md", "pyproject.toml"} <= names
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n]


def test_twine_check_passes(dists: Dists) -> None:
    """The metadata and the README render as the package index will show them."""
    _check([sys.executable, "-m", "twine", "check", "--strict", str(dists.sdist), str(dists.wheel)])


def test_the_wheel_is_typed_and_described(dists: Dists) -> None:
    """py.typed in each package; one version (falhook.__version__); URLs and classifiers."""
    files = _files(dists.wheel)
    for package in ("falhook", "falhook/verify", "falhook/receiver"):
        assert f"{package}/py.typed" in files
    metadata = _metadata(dists.wheel)
    assert metadata["Version"] == falhook.__version__
    assert dists.wheel.name == f"falhook-{falhook.__version__}-py3-none-any.whl"
    written = [
        path.relative_to(REPO_ROOT).as_posix()
        for package in ("falhook", "verify", "receiver")
        for path in (REPO_ROOT / package).rglob("*.py")
        if re.search(r"^__version__\s*=", path.read_text(), re.MULTILINE)
    ]
    assert written == ["falhook/__init__.py"]
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "falhook.__version__"}
    urls = dict(line.split(", ", 1) for line in metadata.get_all("Project-URL", []))
    assert {"Source", "Changelog", "Security", "Issues"} <= set(urls)
    assert all(url.startswith("https://") for url in urls.values())
    classifiers = metadata.get_all("Classifier", [])
    assert "Typing :: Typed" in classifiers
    assert "Programming Language :: Python :: 3.11" in classifiers
    assert metadata["License-Expression"] == "MIT"


def test_the_changelog_keeps_its_format() -> None:
    """Keep a Changelog: "Unreleased" first, then versions newest first, each change
    under one of its six kinds."""
    text = (REPO_ROOT / "CHANGELOG.md").read_text()
    versions = re.findall(r"^## \[([^\]]+)\]", text, re.MULTILINE)
    assert versions and versions[0] == "Unreleased", versions
    released = [tuple(int(p) for p in v.split(".")) for v in versions[1:]]
    assert released == sorted(released, reverse=True)
    kinds = set(re.findall(r"^### (.+)$", text, re.MULTILINE))
    assert kinds <= {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}, kinds


def test_the_wheel_needs_only_its_declared_dependencies(wheel_env: Path, tmp_path: Path) -> None:
    """The venv sees falhook's runtime dependencies and nothing of the dev tools."""
    result = _run(wheel_env, "import pytest", tmp_path)
    assert "No module named 'pytest'" in result.stderr
    version = _run(
        wheel_env, "import importlib.metadata as m; print(m.version('falhook'))", tmp_path
    )
    assert version.stdout.strip() == falhook.__version__, version.stderr


def test_falhook_demo_runs_from_the_wheel(wheel_env: Path, tmp_path: Path) -> None:
    """The demo: a receiver, its store and verdicts, all from the installed wheel."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "FALHOOK_"))}
    done = subprocess.run(
        [str(wheel_env / "falhook"), "demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "401 rejected: invalid_signature" in done.stdout
    assert "demo-ok-1" in done.stdout and "Next:" in done.stdout


def _run(bin_dir: Path, code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "FALHOOK_"))}
    return subprocess.run(
        [str(bin_dir / "python"), "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_only_the_falhook_namespace_is_installed(wheel_env: Path, tmp_path: Path) -> None:
    for name in ("verify", "receiver"):
        result = _run(wheel_env, f"import {name}", tmp_path)
        assert result.returncode != 0
        assert f"No module named '{name}'" in result.stderr
    result = _run(wheel_env, "import falhook.verify, falhook.receiver; print('ok')", tmp_path)
    assert result.stdout.strip() == "ok", result.stderr
    site = _run(wheel_env, "import falhook, os; print(os.path.dirname(falhook.__file__))", tmp_path)
    assert "site-packages" in site.stdout, "the wheel, not the repository, provides falhook"


def _user_project(path: Path) -> None:
    """A user's project whose own modules are named verify and receiver."""
    (path / "verify.py").write_text("WHO = 'the user verify'\n")
    (path / "receiver").mkdir()
    (path / "receiver" / "__init__.py").write_text("WHO = 'the user receiver'\n")
    (path / "hooks.py").write_text(
        "import json, os\n"
        "import receiver\n"
        "import verify\n"
        "def handle(delivery):\n"
        "    with open(os.environ['HOOKS_OUT'], 'a') as out:\n"
        "        out.write(json.dumps([delivery.request_id, verify.WHO, receiver.WHO]) + '\\n')\n"
    )


def test_a_users_verify_and_receiver_coexist_under_python_m(
    wheel_env: Path, tmp_path: Path
) -> None:
    _user_project(tmp_path)
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "__init__.py").write_text("")
    (tmp_path / "myapp" / "__main__.py").write_text(
        "import verify, receiver\n"
        "from falhook.verify import verify_signature\n"
        "from falhook.receiver import WebhookReceiver\n"
        "print(verify.WHO, '|', receiver.WHO, '|', verify_signature.__module__)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "FALHOOK_"))}
    result = subprocess.run(
        [str(wheel_env / "python"), "-m", "myapp"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "the user verify | the user receiver | falhook.verify.signature"
    )


def test_a_users_verify_and_receiver_coexist_under_falhook_serve(
    wheel_env: Path, tmp_path: Path
) -> None:
    _user_project(tmp_path)
    key: KeyPair = generate_keypair()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(jwks_document(key)))
    out = tmp_path / "calls.jsonl"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "FALHOOK_"))}
    env.update(
        FALHOOK_JWKS_URL=str(jwks),
        FALHOOK_DATABASE_URL=f"sqlite:///{tmp_path / 'falhook.db'}",
        HOOKS_OUT=str(out),
        PYTHONPATH=str(tmp_path),  # where the callback module lives, as a user would set it
    )
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [str(wheel_env / "falhook"), "serve", "--port", str(port), "--callback", "hooks:handle"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            try:
                return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, (tmp_path / "serve.log").read_text()
                return False

        wait_for(healthy, timeout=30, what="falhook serve from the wheel")
        body = fal_body("req-packaging")
        answer = httpx.post(
            f"{base}/webhooks/fal",
            content=body,
            headers=sign(body, "req-packaging", USER_ID, keypair=key),
        )
        assert answer.status_code == 200, answer.text
        line = wait_for(lambda: out.exists() and out.read_text(), timeout=30, what="callback")
        assert json.loads(str(line)) == ["req-packaging", "the user verify", "the user receiver"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_the_console_templates_and_stylesheet_are_in_the_wheel(
    wheel_env: Path, tmp_path: Path
) -> None:
    script = (
        "import json, tempfile, re\n"
        "from starlette.testclient import TestClient\n"
        "from falhook.receiver import Settings, WebhookReceiver\n"
        "d = tempfile.mkdtemp()\n"
        "s = Settings(database_url=f'sqlite:///{d}/x.db', jwks_url=f'{d}/none.json',"
        " console_token='t')\n"
        "with TestClient(WebhookReceiver(s).app) as c:\n"
        "    page = c.get('/console/signin')\n"
        "    css = c.get('/console/static/console.css')\n"
        "    print(page.status_code, 'Sign in' in page.text, css.status_code, len(css.text)>99)\n"
        "import falhook.receiver.console as m\n"
        "print(m.__file__)\n"
    )
    result = _run(wheel_env, script, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0] == "200 True 200 True", result.stdout
    assert "site-packages" in lines[1]
