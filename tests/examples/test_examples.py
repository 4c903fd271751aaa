"""Every example runs: the minimal app and the sidecar under real uvicorn processes, the
FastAPI mount in-process with its lifespan, the user's pytest example under pytest."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from falhook.receiver.settings import Settings
from falhook.verify.testing import KeyPair, fal_body, sign

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = REPO_ROOT / "examples"
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(check: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


class Proc:
    """A server subprocess with its output in a log file; killed at the end of the test."""

    def __init__(self, args: Sequence[str], *, cwd: Path, env: dict[str, str], log: Path):
        self.log_path = log
        self._log = log.open("wb")
        base = {k: v for k, v in os.environ.items() if not k.startswith("FALHOOK_")}
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=cwd,
            env={**base, "PYTHONPATH": str(REPO_ROOT), "PYTHONUNBUFFERED": "1", **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_http(self, url: str) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, f"exited early:\n{self.log()}"
            try:
                httpx.get(url, timeout=1)
            except httpx.HTTPError:
                return False
            return True

        wait_until(up, url)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    started: list[Proc] = []

    def start(name: str, args: Sequence[str], env: dict[str, str], cwd: Path = EXAMPLES) -> Proc:
        started.append(Proc(args, cwd=cwd, env=env, log=tmp_path / f"{name}.log"))
        return started[-1]

    yield start
    for proc in started:
        proc.stop()


def deliver(url: str, request_id: str, keypair: KeyPair, **body: Any) -> httpx.Response:
    content = fal_body(request_id, **body)
    headers = sign(content, request_id, "user-1", keypair=keypair)
    return httpx.post(url, content=content, headers=headers, timeout=10)


def test_minimal_app_under_uvicorn(
    spawn: Callable[..., Proc], tmp_path: Path, jwks_file: Path, keypair: KeyPair
) -> None:
    port = free_port()
    env = {
        "FALHOOK_JWKS_URL": str(jwks_file),
        "FALHOOK_DATABASE_URL": f"sqlite:///{tmp_path / 'falhook.db'}",
    }
    app = spawn(
        "minimal",
        ["-m", "uvicorn", "minimal_app:app", "--port", str(port), "--log-level", "warning"],
        env,
    )
    base = f"http://127.0.0.1:{port}"
    app.wait_http(base + "/healthz")
    assert deliver(base + "/webhooks/fal", "min-ok", keypair).status_code == 200
    failed = deliver(
        base + "/webhooks/fal", "min-err", keypair, status="ERROR", error="Invalid status code: 422"
    )
    assert failed.status_code == 200
    wait_until(lambda: "saved min-ok: 1 image(s)" in app.log(), "the OK callback")
    wait_until(lambda: "failed min-err: Invalid status code: 422" in app.log(), "on_error")
    assert not (EXAMPLES / "falhook.db").exists()


def test_fastapi_mount_runs_the_receiver_lifespan(
    tmp_path: Path, jwks_file: Path, keypair: KeyPair
) -> None:
    from examples.fastapi_mount import create_app

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'f.db'}", jwks_url=str(jwks_file))
    with TestClient(create_app(settings)) as client:
        assert client.get("/fal/healthz").status_code == 200
        body = fal_body("mounted-1")
        headers = sign(body, "mounted-1", "user-1", keypair=keypair)
        answer = client.post("/fal/webhooks/fal", content=body, headers=headers)
        assert answer.json() == {"request_id": "mounted-1", "duplicate": False}
        result = wait_until(
            lambda: (r := client.get("/results/mounted-1")).status_code == 200 and r.json(),
            "the mounted receiver's callback",
        )
        assert result["status"] == "OK" and result["payload"]["prompt"] == "dog"
        trailing = client.post("/fal/webhooks/fal/", content=body, headers=headers)
        assert trailing.status_code == 200 and trailing.json()["duplicate"] is True


def test_fastapi_mount_without_the_lifespan_is_a_clear_503(
    tmp_path: Path, jwks_file: Path, keypair: KeyPair
) -> None:
    from fastapi import FastAPI

    from falhook.receiver.app import WebhookReceiver

    hooks = WebhookReceiver(
        Settings(database_url=f"sqlite:///{tmp_path / 'g.db'}", jwks_url=str(jwks_file))
    )
    host = FastAPI()  # forgot lifespan=hooks.lifespan
    host.mount("/fal", hooks.app)
    body = fal_body("lost-1")
    with TestClient(host) as client:
        answer = client.post(
            "/fal/webhooks/fal", content=body, headers=sign(body, "lost-1", "u", keypair=keypair)
        )
    assert answer.status_code == 503 and answer.json()["error"] == "receiver_not_started"


def test_sidecar_forwards_to_the_app(
    spawn: Callable[..., Proc], tmp_path: Path, jwks_file: Path, keypair: KeyPair
) -> None:
    app_port, hook_port = free_port(), free_port()
    app = spawn(
        "app",
        ["-m", "uvicorn", "app:app", "--port", str(app_port), "--log-level", "warning"],
        {},
        cwd=EXAMPLES / "sidecar",
    )
    sidecar = spawn(
        "falhook",
        [
            "-m",
            "falhook.receiver",
            "serve",
            "--port",
            str(hook_port),
            "--forward-to",
            f"http://127.0.0.1:{app_port}/fal-results",
        ],
        {
            "FALHOOK_JWKS_URL": str(jwks_file),
            "FALHOOK_DATABASE_URL": f"sqlite:///{tmp_path / 'sidecar.db'}",
            "FALHOOK_POLL_SECONDS": "0.2",
        },
        cwd=tmp_path,
    )
    app.wait_http(f"http://127.0.0.1:{app_port}/docs")
    sidecar.wait_http(f"http://127.0.0.1:{hook_port}/healthz")
    webhook = f"http://127.0.0.1:{hook_port}/webhooks/fal"
    assert deliver(webhook, "side-1", keypair).status_code == 200
    forged = fal_body("side-forged")
    from falhook.verify.testing import generate_keypair

    headers = sign(forged, "side-forged", "user-1", keypair=generate_keypair())
    assert httpx.post(webhook, content=forged, headers=headers).status_code == 401

    def forwarded() -> Any:
        answer = httpx.get(f"http://127.0.0.1:{app_port}/results/side-1")
        return answer.status_code == 200 and answer.json()

    result = wait_until(forwarded, "the forwarded delivery")
    assert result["status"] == "OK" and result["attempt"] == 1
    missing = httpx.get(f"http://127.0.0.1:{app_port}/results/side-forged")
    assert missing.status_code == 404


def test_user_pytest_example_passes(tmp_path: Path) -> None:
    example = EXAMPLES / "test_signer_example"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALHOOK_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", str(example)],
        cwd=example,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "7 passed" in result.stdout
