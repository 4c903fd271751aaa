"""Fault-injection harness: real `falhook serve` processes on one PostgreSQL database.

Each test gets a database of its own (created and dropped here), a JWKS file, and starts
replicas as subprocesses whose callback (tests/replicas/callbacks.py) logs every call to
``callback_log`` in that database. Invariants are then checked in SQL.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from falhook.receiver.store.listener import libpq_conninfo
from falhook.verify.testing import KeyPair, fal_body, generate_keypair, jwks_document, sign
from tests.replicas.callbacks import CREATE_LOG

PG_URL = os.environ.get("TEST_DATABASE_URL") or None
ROOT = Path(__file__).resolve().parents[2]
USER_ID = "user-replicas"
_SERVE = [sys.executable, "-m", "falhook.receiver", "serve", "--host", "127.0.0.1"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/replicas" in str(item.path) or "tests\\replicas" in str(item.path):
            item.add_marker(pytest.mark.postgres)
            item.add_marker(pytest.mark.slow)
            if PG_URL is None:
                item.add_marker(pytest.mark.skip(reason="TEST_DATABASE_URL is not set"))


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `predicate` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@dataclass
class Database:
    """One test database: its SQLAlchemy URL, and SQL helpers for the invariants."""

    name: str
    url: str
    engine: sa.Engine

    @property
    def dsn(self) -> str:
        return libpq_conninfo(self.url)

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params))

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(sql), params).scalar()

    def states(self) -> dict[str, str]:
        if not self.scalar("SELECT to_regclass('falhook_deliveries') IS NOT NULL"):
            return {}
        return dict(self.rows("SELECT request_id, state FROM falhook_deliveries"))

    def callback_counts(self) -> dict[str, int]:
        return dict(self.rows("SELECT request_id, count(*) FROM callback_log GROUP BY 1"))

    def terminate_backends(self) -> int:
        """pg_terminate_backend every client session on this database but ours."""
        return len(
            self.rows(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend'"
            )
        )

    def assert_acked_done(self, acked: Iterable[str], timeout: float) -> None:
        """Every acknowledged delivery ends done, with at least one logged callback."""
        want = set(acked)

        def settled() -> bool:
            states, counts = self.states(), self.callback_counts()
            return all(states.get(r) == "done" and counts.get(r, 0) >= 1 for r in want)

        try:
            wait_for(settled, timeout, f"{len(want)} acknowledged deliveries to be done")
        except AssertionError:
            states, counts = self.states(), self.callback_counts()
            missing = sorted(r for r in want if states.get(r) != "done" or not counts.get(r))
            raise AssertionError(
                f"{len(missing)} acknowledged deliveries not done with a callback, e.g. "
                + ", ".join(f"{r}: {states.get(r)}/{counts.get(r, 0)}" for r in missing[:5])
            ) from None


def _admin() -> sa.Engine:
    assert PG_URL is not None
    return sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)


@pytest.fixture
def database() -> Iterator[Database]:
    assert PG_URL is not None
    name = f"falhook_rep_{uuid.uuid4().hex[:10]}"
    admin = _admin()
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}")
    url = sa.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with engine.connect() as conn:
        conn.exec_driver_sql(CREATE_LOG)
    try:
        yield Database(name, url, engine)
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.dispose()


@pytest.fixture
def keypair() -> KeyPair:
    return generate_keypair()


@pytest.fixture
def jwks_file(tmp_path: Path, keypair: KeyPair) -> Path:
    import json

    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks_document(keypair)))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Replica:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str) -> int:
        try:
            return httpx.get(self.url + path, timeout=5).status_code
        except httpx.HTTPError:
            return 0

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@dataclass
class Cluster:
    """Starts replicas; stops (or has killed) them all at the end of the test."""

    tmp_path: Path
    jwks_file: Path
    database: Database
    replicas: list[Replica] = field(default_factory=list)

    def start(
        self,
        n: int = 1,
        *,
        database_url: str | None = None,
        log_dsn: str | None = None,
        wait_ready: bool = True,
        **settings: str,
    ) -> list[Replica]:
        started = []
        for _ in range(n):
            name = f"r{len(self.replicas)}"
            port = free_port()
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("FALHOOK_")},
                "FALHOOK_DATABASE_URL": database_url or self.database.url,
                "FALHOOK_JWKS_URL": str(self.jwks_file),
                "FALHOOK_CALLBACK": "tests.replicas.callbacks:record",
                "FALHOOK_CALLBACK_BACKOFF_SECONDS": "0.2",
                "FALHOOK_CALLBACK_BACKOFF_MAX_SECONDS": "1",
                "FALHOOK_POLL_SECONDS": "1",
                "FALHOOK_SHUTDOWN_TIMEOUT_SECONDS": "2",
                "FALHOOK_LOG_LEVEL": "WARNING",
                "FALHOOK_TEST_LOG_DSN": log_dsn or self.database.dsn,
                "FALHOOK_TEST_REPLICA": name,
                **{f"FALHOOK_{k.upper()}": v for k, v in settings.items()},
            }
            log_path = self.tmp_path / f"{name}.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    [*_SERVE, "--port", str(port)],
                    env=env,
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            replica = Replica(name, port, process, log_path)
            self.replicas.append(replica)
            started.append(replica)
        for replica in started:
            path = "/readyz" if wait_ready else "/healthz"

            def up(r: Replica = replica, p: str = path) -> bool:
                return r.get(p) == 200

            try:
                wait_for(up, 30, f"{replica.name} {path}")
            except AssertionError:
                raise AssertionError(f"{replica.name} did not start:\n{replica.log()}") from None
        return started

    def stop_all(self) -> None:
        for replica in self.replicas:
            replica.stop()


@pytest.fixture
def cluster(tmp_path: Path, jwks_file: Path, database: Database) -> Iterator[Cluster]:
    c = Cluster(tmp_path, jwks_file, database)
    try:
        yield c
    finally:
        c.stop_all()


class Sender:
    """Signs and POSTs deliveries, round-robin over replicas, and remembers the 200s."""

    def __init__(self, keypair: KeyPair) -> None:
        self.keypair = keypair
        self.acked: set[str] = set()
        self.statuses: list[int] = []

    def request(self, request_id: str) -> tuple[bytes, dict[str, str]]:
        body = fal_body(request_id, payload={"n": request_id})
        return body, sign(body, request_id, USER_ID, keypair=self.keypair)

    async def send(self, client: httpx.AsyncClient, base: str, request_id: str) -> int:
        body, headers = self.request(request_id)
        try:
            response = await client.post(base + "/webhooks/fal", content=body, headers=headers)
            status = response.status_code
        except httpx.HTTPError:
            status = 0
        self.statuses.append(status)
        if status == 200:
            self.acked.add(request_id)
        return status

    async def send_all(
        self, replicas: list[Replica], request_ids: list[str], concurrency: int = 32
    ) -> list[int]:
        limit = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=30) as client:

            async def one(i: int, rid: str) -> int:
                async with limit:
                    return await self.send(client, replicas[i % len(replicas)].url, rid)

            return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(request_ids))))

    def blast(
        self, replicas: list[Replica], request_ids: list[str], concurrency: int = 32
    ) -> list[int]:
        return asyncio.run(self.send_all(replicas, request_ids, concurrency))
