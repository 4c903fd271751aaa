"""Starting, waiting for, measuring and stopping one server process per target."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

# The same server flags for every target: one uvicorn worker on uvloop and httptools.
UVICORN_FLAGS = (
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--no-access-log",
    "--workers",
    "1",
    "--log-level",
    "warning",
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def uvicorn_command(factory: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        factory,
        "--factory",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *UVICORN_FLAGS,
    ]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except OSError:
            continue
        out.extend(int(c) for c in text.split())
    return out


def process_tree(pid: int) -> list[int]:
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(_children(p))
    return tree


def parse_status_kb(text: str, field_name: str) -> int | None:
    """A ``kB`` field of /proc/PID/status (e.g. VmHWM, the peak resident set size)."""
    for line in text.splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return None


def peak_rss_mb(pid: int) -> float | None:
    """Sum of VmHWM (peak RSS) over the process and its descendants, in MiB.

    For one uvicorn worker this is the server process itself; if a launcher forks the
    server, the sum is an upper bound on the tree's peak.
    """
    total_kb = 0
    seen = False
    for p in process_tree(pid):
        try:
            kb = parse_status_kb(Path(f"/proc/{p}/status").read_text(), "VmHWM")
        except OSError:
            continue
        if kb is not None:
            total_kb += kb
            seen = True
    return total_kb / 1024 if seen else None


def stat_cpu_seconds(stat: Path) -> float:
    """User + system CPU seconds from a ``/proc`` stat file: a process's (``/proc/PID/stat``,
    all its threads) or one thread's (``/proc/PID/task/TID/stat``). Raises OSError once
    the process or thread has ended."""
    # Fields after the command name (which may hold spaces): utime and stime are 12 and 13.
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """CPU time (user + system, seconds) so far of the process and its descendants, all
    their threads; and of the process's main thread alone (uvicorn's event loop)."""
    total = main = 0.0
    for p in process_tree(pid):
        try:
            total += stat_cpu_seconds(Path(f"/proc/{p}/stat"))
            if p == pid:
                main = stat_cpu_seconds(Path(f"/proc/{p}/task/{p}/stat"))
        except OSError:  # the process ended meanwhile
            continue
    return total, main


@dataclass
class Server:
    """A server subprocess; use as a context manager so it is always stopped."""

    name: str
    command: Sequence[str]
    port: int
    env: Mapping[str, str]
    log_path: Path
    health_path: str = "/healthz"
    # Where the server runs, and first on its import path (`python -m` puts the working
    # directory there): `bench.ab` runs another checkout's code from its own tree.
    cwd: Path = REPO_ROOT
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        """The server's environment: ours, its settings, and the import path."""
        env = dict(os.environ)
        env.update(self.env)
        # This checkout last: it provides bench's own modules (targets, callbacks), never
        # a falhook that a caller's PYTHONPATH put first.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (env.get("PYTHONPATH", ""), str(REPO_ROOT)) if p
        )
        env["PATH"] = os.pathsep.join((str(VENV_BIN), env.get("PATH", "")))
        return env

    def start(self, deadline_s: float = 30.0) -> None:
        env = self.environment()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                list(self.command),
                cwd=self.cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self._wait_healthy(deadline_s)

    def _wait_healthy(self, deadline_s: float) -> None:
        assert self.proc is not None
        end = time.monotonic() + deadline_s
        url = self.base_url + self.health_path
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before answering; "
                    f"log: {self.log_tail()}"
                )
            try:
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} did not answer {url} within {deadline_s:g}s")

    def peak_rss_mb(self) -> float | None:
        return None if self.proc is None else peak_rss_mb(self.proc.pid)

    def cpu_seconds(self) -> tuple[float, float]:
        """(all threads of the server's processes, its main thread) CPU seconds so far."""
        return (0.0, 0.0) if self.proc is None else cpu_seconds(self.proc.pid)

    def stop(self, grace_s: float = 15.0) -> int | None:
        """SIGTERM, wait, SIGKILL if it will not go; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
