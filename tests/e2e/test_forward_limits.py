"""Forwarding (`--forward-to`) against hostile or careless targets, with real processes:
a target answering a huge body costs the receiver a bounded amount of memory and never
stalls it; credentials in the target's URL are used, and shown nowhere."""

from __future__ import annotations

import html
import http.server
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import SpawnServer
from tests.e2e.console import signed_in
from tests.e2e.server import REPO_ROOT, Sender, ServerProcess, wait_for

pytestmark = pytest.mark.slow

HUGE = 1024**3  # what the target says it sends: 1 GiB
MiB = 1024**2


class Target:
    """A loopback app behind falhook: answers each POST `status` with a body of
    `answer_bytes` zeros (streamed until the client stops reading), and records requests."""

    def __init__(self, status: int = 200, answer_bytes: int = 0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.sent = 0  # body bytes the receiver took from us
        self.finished = threading.Event()
        target = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                target.requests.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body}
                )
                self.send_response(status)
                self.send_header("content-type", "application/octet-stream")
                self.send_header("content-length", str(answer_bytes))
                self.send_header("connection", "close")  # no socket left open at the end
                self.end_headers()
                chunk = b"\0" * MiB
                try:
                    left = answer_bytes
                    while left > 0:
                        self.wfile.write(chunk[: min(left, MiB)])
                        target.sent += min(left, MiB)
                        left -= MiB
                    self.wfile.flush()
                except OSError:  # the receiver closed the connection: what we want
                    self.close_connection = True
                finally:
                    target.finished.set()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.fixture
def huge_target() -> Iterator[Target]:
    target = Target(200, HUGE)
    try:
        yield target
    finally:
        target.stop()


def test_a_huge_answer_is_not_read(
    spawn: SpawnServer, sender: Sender, client: httpx.Client, huge_target: Target
) -> None:
    server = spawn(args=["--forward-to", f"http://127.0.0.1:{huge_target.port}/in"])
    before = _peak_rss(server.pid)
    slowest = 0.0
    assert sender.post(client, server.webhook_url, "fw-huge").status_code == 200
    deadline = time.monotonic() + 60
    # /healthz answers promptly all along: the forward does not hold the loop.
    while (server.row("fw-huge") or {}).get("state") != "done":
        assert time.monotonic() < deadline, server.log()
        began = time.perf_counter()
        assert client.get(server.url + "/healthz", timeout=10).status_code == 200
        slowest = max(slowest, time.perf_counter() - began)
        time.sleep(0.02)
    assert huge_target.finished.wait(30)
    peak = _peak_rss(server.pid)
    assert peak - before < 200 * MiB, (before // MiB, peak // MiB)
    # The receiver stopped reading at once: what the target got out is what the socket
    # buffers hold, nowhere near the whole answer.
    assert huge_target.sent < 256 * MiB, huge_target.sent // MiB
    assert slowest < 1.0, slowest


# -- credentials in the target's URL --------------------------------------------------

PW = "s3cretPW-71x"
TOKEN = "forward-console-token-4b2d"


@pytest.fixture
def failing_target() -> Iterator[Target]:
    target = Target(500)
    try:
        yield target
    finally:
        target.stop()


def _deliveries_show(server: ServerProcess, *argv: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "falhook.receiver", "deliveries", "show", *argv],
        env={**server.env, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def test_credentials_in_the_forward_url_are_used_and_shown_nowhere(
    spawn: SpawnServer, sender: Sender, client: httpx.Client, failing_target: Target
) -> None:
    url = f"http://app:{PW}@127.0.0.1:{failing_target.port}/hook?api_key={PW}&v=2"
    server = spawn(
        args=["--forward-to", url],
        env={
            "FALHOOK_CALLBACK_MAX_ATTEMPTS": "2",
            "FALHOOK_CALLBACK_BACKOFF_SECONDS": "0.05",
            "FALHOOK_CONSOLE_TOKEN": TOKEN,
            "FALHOOK_LOG_LEVEL": "debug",  # every line there is
        },
    )
    assert sender.post(client, server.webhook_url, "fw-secret").status_code == 200
    wait_for(
        lambda: (server.row("fw-secret") or {}).get("state") == "dead",
        timeout=30,
        what="the forward to fail twice",
    )
    # The target got the credentials: they are used, as given.
    first = failing_target.requests[0]
    assert first["path"] == f"/hook?api_key={PW}&v=2"
    assert first["headers"]["Authorization"].startswith("Basic ")
    shown = f"http://***@127.0.0.1:{failing_target.port}/hook?api_key=***&v=***"

    server.wait_for_log("answered 500")
    # The server's own lines (not the harness's "=== start [command line]").
    log = "\n".join(
        line for line in server.log_path.read_text().splitlines() if not line.startswith("===")
    )
    assert f"forwarding to {shown}" in log  # the start line
    metrics = client.get(server.url + "/metrics").text
    assert f'callback="forward-to:{shown}"' in metrics
    console = signed_in(server.url, TOKEN)
    try:
        page = console.get(server.url + "/console/deliveries/fw-secret").text
    finally:
        console.close()
    assert "answered 500" in page and html.escape(shown) in page
    show = _deliveries_show(server, "fw-secret")
    show_json = _deliveries_show(server, "fw-secret", "--json")
    assert shown in show and "answered 500" in show
    for surface, text in [
        ("log", log),
        ("metrics", metrics),
        ("console", page),
        ("deliveries show", show),
        ("deliveries show --json", show_json),
    ]:
        assert PW not in text, (surface, text[text.find(PW) - 200 : text.find(PW) + 50])
