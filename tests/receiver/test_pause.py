"""Pausing dispatch: the store switch (SQLite and PostgreSQL), the receiver, the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from starlette.testclient import TestClient

from falhook.receiver import Delivery, Settings, WebhookReceiver
from falhook.receiver.cli import main
from falhook.receiver.store import Store
from tests.receiver import store_fixtures
from tests.receiver.conftest import Signer

store_url = store_fixtures.store_url
pg_schema_url = store_fixtures.pg_schema_url


def _until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_the_switch_starts_off_and_keeps_who_why_and_when(store_url: str) -> None:
    store = Store(store_url)
    try:
        assert store.dispatch_control().paused is False
        before = time.time()
        paused = store.set_dispatch_paused(True, reason="downstream <down>", by="cli")
        assert store.dispatch_control() == paused
        assert (paused.paused, paused.reason, paused.changed_by) == (
            True,
            "downstream <down>",
            "cli",
        )
        assert paused.changed_at is not None and paused.changed_at >= before
        resumed = store.set_dispatch_paused(False, by="console")
        assert store.dispatch_control() == resumed
        assert (resumed.paused, resumed.reason, resumed.changed_by) == (False, None, "console")
    finally:
        store.engine.dispose()


def test_pausing_a_paused_store_keeps_since_when_and_why(store_url: str) -> None:
    store = Store(store_url)
    try:
        first = store.set_dispatch_paused(True, reason="warehouse failover", by="cli")
        again = store.set_dispatch_paused(True, reason=None, by="console")
        assert again == first == store.dispatch_control()
        # A new reason for the same pause: said, by whom, and the pause still began then.
        reworded = store.set_dispatch_paused(True, reason="failover, then reindex", by="api")
        assert (reworded.reason, reworded.changed_by) == ("failover, then reindex", "api")
        assert reworded.changed_at == first.changed_at
        resumed = store.set_dispatch_paused(False, by="cli")
        assert store.set_dispatch_paused(False, by="console") == resumed
        assert resumed.changed_at is not None and first.changed_at is not None
        assert resumed.changed_at >= first.changed_at
    finally:
        store.engine.dispose()


def test_a_missing_row_reads_as_running_and_is_recreated(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        store.migrate()
        with store.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM falhook_dispatch_control"))
        assert store.dispatch_control().paused is False
        assert store.set_dispatch_paused(True).paused is True
        assert store.dispatch_control().paused is True
    finally:
        store.engine.dispose()


def _metric(client: TestClient) -> str:
    return next(
        line
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("falhook_dispatch_paused ")
    )


def test_paused_receiver_acks_and_stores_but_starts_no_callback(
    settings: Settings, signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    hooks = WebhookReceiver(settings)
    calls: list[str] = []
    release = threading.Event()

    @hooks.on_delivery
    def record(delivery: Delivery) -> None:
        calls.append(delivery.request_id)
        if delivery.request_id == "slow":
            assert release.wait(10)

    caplog.set_level(logging.WARNING, logger="falhook.dispatch")
    with TestClient(hooks.app) as client:
        assert _metric(client) == "falhook_dispatch_paused 0.0"
        body, headers = signer("slow")
        assert client.post("/webhooks/fal", content=body, headers=headers).status_code == 200
        _until(lambda: calls == ["slow"], 10, "the slow callback to start")

        control = client.portal.call(hooks.pause, "deploying the consumer")  # type: ignore[union-attr]
        assert control.paused and control.reason == "deploying the consumer"
        assert hooks.dispatch_paused is True
        assert _metric(client) == "falhook_dispatch_paused 1.0"
        assert "dispatch paused" in caplog.text and "deploying the consumer" in caplog.text
        assert client.get("/readyz").json() == {"status": "ready", "dispatch": "paused"}

        for rid in ("held-1", "held-2"):
            body, headers = signer(rid)
            response = client.post("/webhooks/fal", content=body, headers=headers)
            assert response.json() == {"request_id": rid, "duplicate": False}
        release.set()  # the running callback finishes while paused
        _until(lambda: hooks.store.get("slow").state.value == "done", 10, "slow to finish")  # type: ignore[union-attr]
        # Several dispatcher polls (0.5 s each): nothing new started.
        time.sleep(1.2)
        assert calls == ["slow"]
        assert {hooks.store.get(r).state.value for r in ("held-1", "held-2")} == {"pending"}  # type: ignore[union-attr]

        client.portal.call(hooks.resume)  # type: ignore[union-attr]
        _until(lambda: sorted(calls) == ["held-1", "held-2", "slow"], 10, "the backlog")
        assert _metric(client) == "falhook_dispatch_paused 0.0"
        assert "dispatch resumed" in caplog.text


def test_a_receiver_follows_a_pause_made_elsewhere_and_starts_paused(
    settings: Settings, signer: Signer
) -> None:
    calls: list[str] = []
    other = Store(settings.database_url)
    try:
        other.set_dispatch_paused(True, reason="maintenance", by="cli")
        hooks = WebhookReceiver(settings, callbacks=[lambda d: calls.append(d.request_id)])
        with TestClient(hooks.app) as client:
            # Read at start: a replica starting while paused claims nothing.
            assert hooks.dispatch_paused is True
            body, headers = signer("while-paused")
            assert client.post("/webhooks/fal", content=body, headers=headers).status_code == 200
            time.sleep(1.0)
            assert calls == []
            other.set_dispatch_paused(False, by="cli")  # another process: seen by the poll
            _until(lambda: calls == ["while-paused"], 5, "resume to be seen")
            other.set_dispatch_paused(True, by="cli")
            _until(lambda: hooks.dispatch_paused is True, 3, "pause to be seen")
    finally:
        other.engine.dispose()


@pytest.mark.postgres
def test_pg_notify_reaches_the_watcher_at_once(pg_schema_url: str) -> None:
    from falhook.receiver.pause import PauseWatcher
    from falhook.receiver.store.control import CONTROL_CHANNEL
    from falhook.receiver.store.listener import Listener

    async def body() -> None:
        store = Store(pg_schema_url)
        seen = asyncio.Event()
        watcher = PauseWatcher(store, lambda c: seen.set() if c.paused else None, poll_seconds=60)
        await watcher.start()
        listener = Listener(pg_schema_url, lambda: None, also={CONTROL_CHANNEL: watcher.poke})
        listener.start()
        try:
            assert await asyncio.to_thread(listener.connected.wait, 10)
            await asyncio.to_thread(store.set_dispatch_paused, True, reason="x")
            # The poll is a minute away: only NOTIFY can bring it this fast.
            await asyncio.wait_for(seen.wait(), 5)
        finally:
            await listener.stop()
            await watcher.stop()
            store.engine.dispose()

    asyncio.run(body())


# -- the CLI ---------------------------------------------------------------------------


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_pause_status_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"sqlite:///{tmp_path / 'falhook.db'}"
    Store(url).migrate()
    db = ["--database-url", url]
    code, out, _ = _run(capsys, "dispatch", "status", *db)
    assert (code, out) == (0, "dispatch running\n")
    code, out, _ = _run(capsys, "dispatch", "pause", "--reason", "db  failover", *db)
    assert code == 0
    assert out.startswith("dispatch paused since ") and "by cli (reason: db failover)" in out
    code, out, _ = _run(capsys, "dispatch", "status", "--json", *db)
    document = json.loads(out)
    assert document["paused"] is True and document["reason"] == "db failover"
    assert document["changed_by"] == "cli" and document["changed_at"].endswith("Z")
    code, out, _ = _run(capsys, "dispatch", "resume", *db)
    assert code == 0 and out.startswith("dispatch running (resumed ")
    assert Store(url).dispatch_control().paused is False


def test_cli_mistakes_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "dispatch")
    assert code == 2 and err.startswith("falhook dispatch: ") and "ACTION" in err
    code, _, err = _run(capsys, "dispatch", "pause", "--database-url", "mysql://x")
    assert code == 2 and err.strip().count("\n") == 0 and "--database-url" in err
    missing = f"sqlite:///{tmp_path / 'missing.db'}"
    code, _, err = _run(capsys, "dispatch", "status", "--database-url", missing)
    assert code == 3 and err.startswith("falhook dispatch status: store unavailable: no database")
