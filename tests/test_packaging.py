"""The built wheel installs one namespace, `falhook`, and leaves `verify` and `receiver` free.

A fresh venv gets the wheel (no editable finder, no repository on sys.path); the runtime
dependencies come from the test environment's site-packages through a path file, so the
test needs no network. In it, a user's own `verify.py` and `receiver/` beside a callback
module coexist with falhook's packages, under `falhook serve` and under `python -m`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from falhook.verify.testing import KeyPair, fal_body, generate_keypair, jwks_document, sign
from tests.e2e.server import free_port, wait_for

REPO_ROOT = Path(__file__).resolve().parents[1]
PIP = (sys.executable, "-m", "pip")
USER_ID = "user-packaging"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A venv with only the built falhook wheel installed; returns its bin directory."""
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    build = subprocess.run(
        [*PIP, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(REPO_ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = dist.glob("falhook-*.whl")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    bin_dir = env_dir / "bin"
    target = subprocess.run(
        [
            str(bin_dir / "python"),
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # The dependencies, not falhook: a plain path entry does not run the editable install's
    # own .pth finder, so only the wheel can provide `falhook` in this venv.
    Path(target, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [
            *PIP,
            "--python",
            str(bin_dir / "python"),
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr
    yield bin_dir


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
