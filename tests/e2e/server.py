"""Run a real `falhook serve` subprocess on loopback, and talk to it.

`ServerProcess` starts ``python -m falhook.receiver serve`` with a SQLite file and a JWKS (a
loopback `JWKSServer` URL or a file), waits for ``/healthz`` with a deadline, and stops it
with SIGTERM (graceful) or SIGKILL (a crash). Its output goes to a log file that failure
messages quote.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import httpx

from falhook.verify.testing import KeyPair, fal_body, sign
from tests.e2e.callbacks import RECORD_ENV
from tests.polling import wait_for as wait_for  # re-exported: the e2e tests import it here

REPO_ROOT = Path(__file__).resolve().parents[2]
RECORD_CALLBACK = "tests.e2e.callbacks:record"
USER_ID = "user-e2e"
T = TypeVar("T")


def free_port() -> int:
    """A loopback port the kernel just handed out (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """One `falhook serve` process (restartable on the same database and port)."""

    def __init__(
        self,
        workdir: Path,
        *,
        jwks: str,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = ("--callback", RECORD_CALLBACK),
        port: int | None = None,
    ) -> None:
        self.workdir = workdir
        self.db_path = workdir / "falhook.db"
        self.record_path = workdir / "record.jsonl"
        self.log_path = workdir / "server.log"
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.webhook_url = self.url + "/webhooks/fal"
        self.args = list(args)
        base = {k: v for k, v in os.environ.items() if not k.startswith("FALHOOK_")}
        pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), base.get("PYTHONPATH")]))
        self.env = {
            **base,
            "PYTHONPATH": pythonpath,
            "PYTHONUNBUFFERED": "1",
            "FALHOOK_DATABASE_URL": f"sqlite:///{self.db_path}",
            "FALHOOK_JWKS_URL": jwks,
            "FALHOOK_USER_ID": USER_ID,
            RECORD_ENV: str(self.record_path),
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, *, wait: bool = True, timeout: float = 30.0) -> ServerProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        command = [sys.executable, "-m", "falhook.receiver", "serve"]
        command += ["--host", "127.0.0.1", "--port", str(self.port), *self.args]
        with self.log_path.open("ab") as log:
            log.write(f"\n=== start {command}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                command, cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout: float = 30.0) -> None:
        def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return httpx.get(self.url + "/healthz", timeout=1.0).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout=timeout, interval=0.05, what=f"{self.url}/healthz")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: a crash, with no chance to clean up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait for the exit code (SIGKILL if it does not exit in time)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server ignored SIGTERM for {timeout} s:\n{self.log()}") from None

    def restart(self) -> ServerProcess:
        return self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return "(no log)"

    def wait_for_log(self, text: str, timeout: float = 10.0) -> None:
        """Wait until ``text`` is in the log: lines are written by a background thread,
        a burst at a time, a moment after they are logged."""

        def written() -> bool:
            try:
                return text in self.log_path.read_text(errors="replace")
            except FileNotFoundError:
                return False

        wait_for(written, timeout=timeout, what=f"{text!r} in the log\n{self.log()}")

    # -- what it did -------------------------------------------------------------------

    def records(self) -> list[dict[str, Any]]:
        """Every callback record written so far (complete lines only)."""
        try:
            text = self.record_path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]

    def done_ids(self) -> set[str]:
        return {r["request_id"] for r in self.records() if r["phase"] == "done"}

    def wait_records(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 20.0
    ) -> list[dict[str, Any]]:
        def check() -> list[dict[str, Any]] | None:
            records = self.records()
            return records if predicate(records) else None

        try:
            return wait_for(check, timeout=timeout, what="callback records")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nrecords: {self.records()}\nlog:\n{self.log()}") from None

    def row(self, request_id: str) -> dict[str, Any] | None:
        """The delivery's row, read straight from the SQLite file."""
        with sqlite3.connect(self.db_path, timeout=30) as conn:
            conn.row_factory = sqlite3.Row
            row = conn.execute(
                "SELECT * FROM falhook_deliveries WHERE request_id = ?", (request_id,)
            ).fetchone()
        return dict(row) if row is not None else None


class Sender:
    """Signs deliveries as fal does and POSTs them."""

    def __init__(self, keypair: KeyPair, user_id: str = USER_ID) -> None:
        self.keypair = keypair
        self.user_id = user_id

    def signed(
        self, request_id: str, body: bytes | None = None, **fields: Any
    ) -> tuple[bytes, dict[str, str]]:
        body = fal_body(request_id, **fields) if body is None else body
        return body, sign(body, request_id, self.user_id, keypair=self.keypair)

    def post(
        self, client: httpx.Client, url: str, request_id: str, **fields: Any
    ) -> httpx.Response:
        body, headers = self.signed(request_id, **fields)
        return client.post(url, content=body, headers=headers)
