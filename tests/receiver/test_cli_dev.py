"""`falhook keygen`, `falhook send` and `falhook demo`."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from falhook.receiver.cli import main
from falhook.receiver.cli.dev import backoff_delay
from falhook.verify import load_keys, verify_signature
from falhook.verify.testing import KeyPair

REPO_ROOT = Path(__file__).resolve().parents[2]
Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Run:
    def invoke(*argv: str) -> tuple[int, str, str]:
        try:
            code = main(list(argv))
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return invoke


# -- keygen ----------------------------------------------------------------------------


def test_keygen_writes_a_key_and_its_jwks(run: Run, tmp_path: Path) -> None:
    out = tmp_path / "keys"
    code, text, _ = run("keygen", "--out", str(out))
    assert code == 0
    key_path, jwks_path = out / "falhook-key.json", out / "jwks.json"
    assert str(key_path.resolve()) in text and str(jwks_path.resolve()) in text
    assert f"FALHOOK_JWKS_URL={jwks_path.resolve()}" in text
    assert key_path.stat().st_mode & 0o077 == 0  # private key readable only by its owner
    keypair = KeyPair.load(key_path)
    [public] = load_keys(jwks_path)
    assert public.kid == keypair.kid and bytes(public) == bytes(keypair.public_key)


def test_keygen_refuses_to_overwrite_without_force(run: Run, tmp_path: Path) -> None:
    assert run("keygen", "--out", str(tmp_path))[0] == 0
    before = KeyPair.load(tmp_path / "falhook-key.json").kid
    code, out, err = run("keygen", "--out", str(tmp_path))
    assert code == 2 and out == "" and "--force" in err and err.count("\n") == 1
    assert KeyPair.load(tmp_path / "falhook-key.json").kid == before
    assert run("keygen", "--out", str(tmp_path), "--force")[0] == 0
    assert KeyPair.load(tmp_path / "falhook-key.json").kid != before


def test_keygen_unwritable_dir_is_exit_2(run: Run, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run("keygen", "--out", str(blocker / "sub"))
    assert code == 2 and "cannot write" in err


# -- send ------------------------------------------------------------------------------


class Target:
    """A loopback HTTP endpoint answering a script of statuses and recording requests."""

    def __init__(self, statuses: list[int], *, stall_first: bool = False) -> None:
        self.statuses = statuses
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.release = threading.Event()
        self.stall_first = stall_first
        target = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                index = len(target.requests)
                target.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                if target.stall_first and index == 0:
                    target.release.wait(5)  # longer than the client's timeout
                status = target.statuses[min(index, len(target.statuses) - 1)]
                answer = json.dumps({"attempt": index + 1}).encode()
                try:
                    self.send_response(status)
                    if 300 <= status < 400:
                        self.send_header("Location", "https://example.com/elsewhere")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and went away, as intended

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhooks/fal"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def target() -> Iterator[Callable[..., Target]]:
    started: list[Target] = []

    def start(statuses: list[int], **kwargs: Any) -> Target:
        started.append(Target(statuses, **kwargs))
        return started[-1]

    yield start
    for t in started:
        t.stop()


@pytest.fixture
def key_file(tmp_path: Path, keypair: KeyPair) -> Path:
    path = tmp_path / "falhook-key.json"
    keypair.save(path)
    return path


def test_send_signs_exactly_like_fal(
    run: Run, target: Callable[..., Target], key_file: Path, keypair: KeyPair
) -> None:
    t = target([200])
    code, out, _ = run(
        "send", t.url, "--key", str(key_file), "--request-id", "r1", "--user-id", "u1"
    )
    assert code == 0
    assert '200 {"attempt": 1}' in out
    [(headers, body)] = t.requests
    verified = verify_signature(body, headers, keys=keypair.public_key, user_id="u1")
    assert verified.request_id == "r1"
    document = json.loads(body)
    assert document["status"] == "OK" and document["request_id"] == "r1"
    assert document["error"] is None and headers["content-type"] == "application/json"


def test_send_error_with_payload_file(
    run: Run, target: Callable[..., Target], key_file: Path, tmp_path: Path
) -> None:
    payload = tmp_path / "payload.json"
    payload.write_text('{"detail": "boom", "seed": 17454220438242315174}')
    t = target([200])
    code, _, _ = run(
        "send", t.url, "--key", str(key_file), "--status", "ERROR", "--payload", str(payload)
    )
    assert code == 0
    document = json.loads(t.requests[0][1])
    assert document["status"] == "ERROR" and document["error"] == "Invalid status code: 422"
    assert document["payload"] == {"detail": "boom", "seed": 17454220438242315174}


def test_send_non_2xx_is_exit_1_without_retry(
    run: Run, target: Callable[..., Target], key_file: Path
) -> None:
    t = target([503])
    code, out, _ = run("send", t.url, "--key", str(key_file))
    assert code == 1 and "503" in out and len(t.requests) == 1


def test_send_retries_like_fal_with_fresh_signatures(
    run: Run, target: Callable[..., Target], key_file: Path, keypair: KeyPair
) -> None:
    t = target([503, 500, 401, 200])
    code, out, _ = run("send", t.url, "--key", str(key_file), "--retry-like-fal", "--backoff", "0")
    assert code == 0 and len(t.requests) == 4
    assert "attempt 1: 503" in out and "attempt 4: 200" in out
    for headers, body in t.requests:  # every attempt is signed on its own
        verify_signature(body, headers, keys=keypair.public_key)


def test_send_gives_up_after_max_attempts(
    run: Run, target: Callable[..., Target], key_file: Path
) -> None:
    t = target([503])
    code, out, _ = run(
        "send",
        t.url,
        "--key",
        str(key_file),
        "--retry-like-fal",
        "--max-attempts",
        "3",
        "--backoff",
        "0.001",
    )
    assert code == 1 and len(t.requests) == 3 and "gave up after 3 attempts" in out
    assert "retrying in 0.001 s" in out and "retrying in 0.002 s" in out


def test_send_never_follows_or_retries_a_redirect(
    run: Run, target: Callable[..., Target], key_file: Path
) -> None:
    t = target([307, 200])
    code, out, _ = run("send", t.url, "--key", str(key_file), "--retry-like-fal", "--backoff", "0")
    assert code == 1 and len(t.requests) == 1
    assert "permanent failure" in out and "https://example.com/elsewhere" in out


def test_send_retries_a_timeout(run: Run, target: Callable[..., Target], key_file: Path) -> None:
    t = target([200], stall_first=True)
    code, out, _ = run(
        "send",
        t.url,
        "--key",
        str(key_file),
        "--retry-like-fal",
        "--backoff",
        "0",
        "--timeout",
        "0.3",
    )
    t.release.set()
    assert code == 0 and "attempt 1: no answer: timed out" in out and "attempt 2: 200" in out


def test_send_connection_refused_is_exit_1(run: Run, key_file: Path) -> None:
    code, out, err = run("send", "http://127.0.0.1:1/webhooks/fal", "--key", str(key_file))
    assert code == 1 and "no answer" in out and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ftp://x"], "must start with http"),
        (["http://x", "--key", "/nonexistent/key.json"], "run `falhook keygen` first"),
        (["http://x", "--payload", "/nonexistent.json"], "cannot read"),
        (["http://x", "--status", "MAYBE"], "invalid choice"),
        (["http://x", "--max-attempts", "0"], "must be at least 1"),
        (["http://x", "--backoff", "-1"], "zero or more"),
    ],
)
def test_send_bad_arguments(run: Run, key_file: Path, argv: list[str], message: str) -> None:
    key = [] if "--key" in argv else ["--key", str(key_file)]
    code, out, err = run("send", *argv, *key)
    assert code == 2 and out == "" and message in err and "Traceback" not in err


def test_send_payload_not_json_is_exit_2(run: Run, key_file: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    code, _, err = run("send", "http://x", "--key", str(key_file), "--payload", str(bad))
    assert code == 2 and "is not JSON" in err


def test_send_not_a_key_file_is_exit_2(run: Run, tmp_path: Path) -> None:
    bogus = tmp_path / "key.json"
    bogus.write_text("{}")
    code, _, err = run("send", "http://x", "--key", str(bogus))
    assert code == 2 and "not a falhook key file" in err


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_delay(n, 1.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff_delay(40, 1.0) == 600.0 and backoff_delay(3, 0.5, cap=1.0) == 1.0


# -- keygen + serve + send, with no network -------------------------------------------

CALLBACK_MODULE = """
import json, os

def handle(delivery):
    with open(os.environ["RECORD"], "a") as f:
        f.write(json.dumps({"request_id": delivery.request_id, "status": delivery.status}) + "\\n")
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.slow
def test_keygen_serve_send_offline(run: Run, tmp_path: Path) -> None:
    import httpx

    assert run("keygen", "--out", str(tmp_path))[0] == 0
    (tmp_path / "myhooks.py").write_text(CALLBACK_MODULE)
    record = tmp_path / "record.jsonl"
    db = tmp_path / "falhook.db"
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALHOOK_")}
    env |= {
        "FALHOOK_JWKS_URL": str(tmp_path / "jwks.json"),  # a file: no network at all
        "FALHOOK_DATABASE_URL": f"sqlite:///{db}",
        "FALHOOK_POLL_SECONDS": "0.1",
        "RECORD": str(record),
        "PYTHONPATH": str(REPO_ROOT),
    }
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "falhook.receiver",
            "serve",
            "--port",
            str(port),
            "--callback",
            "myhooks:handle",
        ],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:

        def healthy() -> bool:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200
            except httpx.HTTPError:
                return False

        _wait(healthy, "falhook serve to answer /healthz")
        url = f"http://127.0.0.1:{port}/webhooks/fal"
        key = str(tmp_path / "falhook-key.json")
        code, out, _ = run("send", url, "--key", key, "--request-id", "req-offline")
        assert code == 0 and '"duplicate":false' in out
        code, out, _ = run("send", url, "--key", key, "--request-id", "req-offline")
        assert code == 0 and '"duplicate":true' in out
        _wait(lambda: record.exists() and "req-offline" in record.read_text(), "the callback")

        def done() -> bool:
            code, out, _ = run("deliveries", "list", "--database-url", f"sqlite:///{db}", "--json")
            return code == 0 and json.loads(out)[0]["state"] == "done"

        _wait(done, "the delivery to be done")
        assert record.read_text().count("req-offline") == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


# -- demo ------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_runs_offline_and_explains_rejections(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FALHOOK_")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "falhook.receiver", "demo"],
        cwd=tmp_path,  # it must not create ./falhook.db
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "callback on_ok(demo-ok-1)" in out
    # Keep the media: the OK result's image was archived before its callback ran.
    assert "its file /images/0/url: archived → file:///" in out and "dog.png" in out
    assert "attempt 2 — succeeded" in out  # the failing callback was retried
    assert "200 duplicate" in out and "on_ok ran 1 time(s)" in out
    assert "401 rejected: invalid_signature" in out  # the forged delivery, and why
    assert "401 rejected: timestamp_too_old" in out
    assert "401 rejected: user_mismatch" in out
    # Step 8: a submitted request whose webhook never came is recovered from the queue.
    assert "source queue" in out and ": recovered (fetched from fal's queue" in out
    assert out.count("on_ok ran 1 time(s)") == 2  # the late webhook was a duplicate
    assert "lighthouse.png" in out and out.count(": archived → file:///") == 2
    assert result.stderr == ""  # no log noise
    assert list(tmp_path.iterdir()) == []
    assert time.monotonic() - started < 30
