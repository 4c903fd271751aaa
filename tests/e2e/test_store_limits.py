"""A store that stalls or lies, under a real `falhook serve`: every wait is bounded, a
deleted database is noticed, and bodies the store cannot take are answered for good."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import SpawnServer
from tests.e2e.server import Sender, ServerProcess, wait_for

pytestmark = pytest.mark.slow

FAST = {"FALHOOK_STORE_TIMEOUT_SECONDS": "1"}


def _timed(call: object) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = call()  # type: ignore[operator]
    return response, time.monotonic() - started


def test_a_held_write_lock_gets_503_in_time_not_a_hang(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    server = spawn(env=FAST)
    assert sender.post(client, server.webhook_url, "before-lock").status_code == 200
    holder = sqlite3.connect(server.db_path, timeout=5, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        response, took = _timed(lambda: sender.post(client, server.webhook_url, "locked"))
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "store_unavailable"
        assert took < 4, took
        ready, took = _timed(lambda: client.get(server.url + "/readyz"))
        assert ready.status_code == 503, ready.text
        assert took < 4, took
    finally:
        holder.rollback()
        holder.close()

    # The lock is gone: the same delivery (fal retries it) is accepted.
    def accepted() -> httpx.Response | None:
        response = sender.post(client, server.webhook_url, "locked")
        return response if response.status_code == 200 else None

    response = wait_for(accepted, timeout=15, what="a 200 once the lock is released")
    assert response.json()["request_id"] == "locked"


def test_a_deleted_database_file_is_noticed(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    server = spawn()
    assert sender.post(client, server.webhook_url, "kept").status_code == 200
    for suffix in ("", "-wal", "-shm"):
        path = f"{server.db_path}{suffix}"
        if os.path.exists(path):
            os.unlink(path)

    def refused() -> bool:
        return (
            sender.post(client, server.webhook_url, f"gone-{time.monotonic_ns()}").status_code
            == 503
        )

    wait_for(refused, timeout=5, what="503 after the database file was deleted")
    assert client.get(server.url + "/readyz").status_code == 503
    server.wait_for_log("deleted or replaced")


def _raw_body(request_id: str, **text_fields: str) -> bytes:
    fields = "".join(f', "{name}": "{value}"' for name, value in text_fields.items())
    return (
        f'{{"request_id": "{request_id}", "status": "ERROR", "payload": null{fields}}}'
    ).encode()


def test_lone_surrogates_in_text_fields_are_stored(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    server = spawn()
    body = _raw_body(
        "surrogate", error="bad \\ud800", gateway_request_id="\\udc00", payload_error="x\\ud800y"
    )
    json.loads(body)  # valid JSON: a lone surrogate escape is allowed by the grammar
    _, headers = sender.signed("surrogate", body=body)
    response = client.post(server.webhook_url, content=body, headers=headers)
    assert response.status_code == 200, response.text
    row = server.row("surrogate")
    assert row is not None
    assert row["error"] == "bad \ufffd"


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_nul_in_text_fields_is_stored_and_delivered_as_sent(
    spawn: SpawnServer, sender: Sender, client: httpx.Client, backend: str
) -> None:
    env = {}
    if backend == "postgresql":
        if PG_URL is None:
            pytest.skip("TEST_DATABASE_URL is not set")
        env = {"FALHOOK_DATABASE_URL": PG_URL}
    server = spawn(env=env)
    rid = f"nul-{time.monotonic_ns()}"
    # PostgreSQL cannot hold NUL in a text column; the body is bytes and keeps it.
    body = _raw_body(rid, error="a\\u0000b", gateway_request_id="g\\u0000", payload_error="\\u0000")
    assert json.loads(body)["error"] == "a\x00b"
    _, headers = sender.signed(rid, body=body)
    response = client.post(server.webhook_url, content=body, headers=headers)
    assert response.status_code == 200, f"{response.text}\n{server.log()}"
    ready = client.get(server.url + "/readyz")
    assert ready.status_code == 200, ready.text
    (record,) = [
        r
        for r in server.wait_records(lambda rs: any(r["request_id"] == rid for r in rs))
        if r["request_id"] == rid
    ]
    # The callback gets the true values, read from the body.
    assert record["error"] == "a\x00b" and record["payload_error"] == "\x00"
    assert record["gateway_request_id"] == "g\x00"
    shown = subprocess.run(
        [sys.executable, "-m", "falhook.receiver", "deliveries", "show", rid, "--json"],
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["body"]["error"] == "a\x00b"


def test_an_over_long_request_id_is_400(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    server = spawn()
    request_id = "r" * 1000
    response = sender.post(client, server.webhook_url, request_id)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "request_id_too_long"
    assert server.row(request_id) is None
    assert sender.post(client, server.webhook_url, "r" * 255).status_code == 200


@pytest.fixture
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 3 MiB tmpfs (needs root; skipped where mounting is not allowed)."""
    mountpoint = tmp_path_factory.mktemp("disk")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mountpoint)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_readyz_says_not_ready_when_a_write_cannot_commit(
    spawn: SpawnServer, sender: Sender, client: httpx.Client, small_disk: Path
) -> None:
    server = spawn(env={"FALHOOK_DATABASE_URL": f"sqlite:///{small_disk / 'falhook.db'}"})
    assert sender.post(client, server.webhook_url, "before-full").status_code == 200
    assert client.get(server.url + "/readyz").status_code == 200
    filler = small_disk / "filler"
    # Fill the disk to the last block.
    with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    # Deliveries that need new pages in the WAL now fail...
    statuses = [
        sender.post(
            client, server.webhook_url, f"full-{i}", payload={"pad": "x" * 50_000}
        ).status_code
        for i in range(40)
    ]
    assert 503 in statuses, statuses
    # ... and /readyz agrees (its verdict is kept for a couple of seconds).
    wait_for(
        lambda: client.get(server.url + "/readyz").status_code == 503,
        timeout=10,
        what="not ready on a full disk",
    )
    filler.unlink()
    wait_for(
        lambda: client.get(server.url + "/readyz").status_code == 200,
        timeout=10,
        what="ready again once there is room",
    )


def test_readyz_is_not_ready_on_a_full_disk_before_any_delivery_fails(
    spawn: SpawnServer, sender: Sender, client: httpx.Client, small_disk: Path
) -> None:
    server = spawn(env={"FALHOOK_DATABASE_URL": f"sqlite:///{small_disk / 'falhook.db'}"})
    assert sender.post(client, server.webhook_url, "before-full").status_code == 200
    assert client.get(server.url + "/readyz").status_code == 200
    filler = small_disk / "filler"
    with filler.open("wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    # No delivery is sent: the probe alone finds that nothing could be stored...
    wait_for(
        lambda: client.get(server.url + "/readyz").status_code == 503,
        timeout=10,
        what="not ready on a full disk",
    )
    ready = client.get(server.url + "/readyz")
    assert ready.json()["error"] == "store_unavailable" and "free" in ready.json()["detail"]
    # ... and it says so for as long as the disk stays full (several probe periods).
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline:
        assert client.get(server.url + "/readyz").status_code == 503
    filler.unlink()
    wait_for(
        lambda: client.get(server.url + "/readyz").status_code == 200,
        timeout=10,
        what="ready again once there is room",
    )
    assert sender.post(client, server.webhook_url, "after-full").status_code == 200


PG_URL = os.environ.get("TEST_DATABASE_URL") or None


@pytest.mark.skipif(PG_URL is None, reason="TEST_DATABASE_URL is not set")
def test_postgresql_lock_waits_are_bounded(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    import psycopg

    assert PG_URL is not None
    server = spawn(env={**FAST, "FALHOOK_DATABASE_URL": PG_URL, "FALHOOK_POLL_SECONDS": "0.5"})
    tag = f"pglock-{time.monotonic_ns()}"
    assert sender.post(client, server.webhook_url, f"{tag}-before").status_code == 200
    conninfo = PG_URL.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo) as holder:
        holder.execute("LOCK TABLE falhook_deliveries IN ACCESS EXCLUSIVE MODE")
        response, took = _timed(lambda: sender.post(client, server.webhook_url, f"{tag}-locked"))
        assert response.status_code == 503, response.text
        assert took < 4, took
        ready, took = _timed(lambda: client.get(server.url + "/readyz"))
        assert ready.status_code == 503, ready.text
        assert took < 4, took
        # The store's own statements give up too (lock_timeout), rather than waiting for
        # as long as the lock is held: none of its sessions waits on a lock for long.
        with psycopg.connect(conninfo, autocommit=True) as observer:
            deadline = time.monotonic() + 9
            while time.monotonic() < deadline:
                row = observer.execute(
                    "SELECT COALESCE(MAX(EXTRACT(EPOCH FROM now() - query_start)), 0) "
                    "FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database() AND pid <> %s",
                    (holder.info.backend_pid,),
                ).fetchone()
                assert row is not None
                assert float(row[0]) < 7, f"a store statement waited {row[0]} s for a lock"
                time.sleep(0.2)
        holder.rollback()
    wait_for(
        lambda: sender.post(client, server.webhook_url, f"{tag}-locked").status_code == 200,
        timeout=15,
        what="a 200 once the lock is released",
    )


def _chattr(flag: str, *paths: Path) -> bool:
    existing = [str(p) for p in paths if p.exists()]
    result = subprocess.run(["chattr", flag, *existing], capture_output=True, check=False)
    return result.returncode == 0


def _post_as_fal_would(post: Callable[[], httpx.Response]) -> int:
    """A reused keep-alive connection the server had just closed reads as a reset under a
    loaded machine: like fal, send the same delivery again (once) on a new connection."""
    try:
        return post().status_code
    except httpx.TransportError:
        return post().status_code


def _wal_checkpointed(shm: Path) -> bool:
    """Every WAL frame copied into the database file: the -shm file's index header says
    mxFrame (bytes 16-20) and its checkpoint info nBackfill (bytes 96-100) are equal. Read
    as a plain file, so this process takes no SQLite lock the server would see."""
    header = shm.read_bytes()[:100]
    if len(header) < 100:
        return False
    (max_frame,) = struct.unpack_from("=I", header, 16)
    (backfilled,) = struct.unpack_from("=I", header, 96)
    return bool(max_frame == backfilled)


def _settled(server: ServerProcess, client: httpx.Client, done: int) -> bool:
    """`done` deliveries finished and the WAL checkpointed behind them: nothing in the
    server writes to its files until the next request."""
    metrics = client.get(server.url + "/metrics").text
    line = f'falhook_deliveries{{state="done"}} {float(done)}'
    return line in metrics.splitlines() and _wal_checkpointed(Path(f"{server.db_path}-shm"))


def test_immutable_database_files_get_503_not_a_crash(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    server = spawn()
    assert sender.post(client, server.webhook_url, "before-immutable").status_code == 200
    # A write in flight when the files turn immutable (the delivery's outcome, the WAL
    # checkpoint after it) can still be killed by the kernel, as the README says: the
    # files change only once the server is idle.
    wait_for(lambda: _settled(server, client, done=1), timeout=10, what="the server idle")
    files = [server.db_path.with_name(server.db_path.name + s) for s in ("", "-wal", "-shm")]
    if not _chattr("+i", *files):
        pytest.skip("chattr +i is not available here (needs root and a filesystem with it)")
    try:
        # SQLite maps the -shm file: writing through it when it cannot grow is a SIGBUS.
        statuses = [
            _post_as_fal_would(
                functools.partial(
                    sender.post,
                    client,
                    server.webhook_url,
                    f"imm-{i}",
                    payload={"pad": "x" * 50_000},
                )
            )
            for i in range(20)
        ]
        assert server.proc is not None and server.proc.poll() is None, server.log()
        assert set(statuses) == {503}, statuses
        assert client.get(server.url + "/readyz").status_code == 503
        server.wait_for_log("not writable")
    finally:
        _chattr("-i", *files)
    wait_for(
        lambda: sender.post(client, server.webhook_url, "after-immutable").status_code == 200,
        timeout=10,
        what="a 200 once the files are writable again",
    )


def test_a_delivery_answered_503_but_committed_late_is_dispatched_at_once(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    # The lease is a minute: without a dispatch at once, the callback would wait for it.
    server = spawn(env={**FAST, "FALHOOK_LEASE_SECONDS": "60"})
    assert sender.post(client, server.webhook_url, "before-late").status_code == 200
    holder = sqlite3.connect(server.db_path, timeout=5, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # the writer waits for the lock (up to 5 s)...
        response = sender.post(client, server.webhook_url, "late")
        assert response.status_code == 503, response.text  # ... past the 1 s store timeout
    finally:
        holder.rollback()  # ... and then commits: fal was told 503, the row is stored
        holder.close()
    records = server.wait_records(
        lambda rs: any(r["request_id"] == "late" and r["phase"] == "done" for r in rs),
        timeout=15,
    )
    assert [r["attempt"] for r in records if r["request_id"] == "late"] == [1]
    wait_for(
        lambda: (server.row("late") or {}).get("state") == "done", timeout=10, what="late done"
    )
    # fal's retry of the 503 is a duplicate: the callback does not run twice.
    retry = sender.post(client, server.webhook_url, "late")
    assert retry.status_code == 200 and retry.json()["duplicate"] is True
    server.wait_for_log("committed after its 503")
