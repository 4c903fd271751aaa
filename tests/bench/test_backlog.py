"""The dispatch-backlog check of the falhook targets, on a real SQLite store."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from bench import backlog
from falhook.receiver.store import Store
from tests.receiver.store_fixtures import delivery


def _store_with(url: str, ids: list[str]) -> Store:
    store = Store(url)

    async def insert() -> None:
        store.start()
        try:
            for request_id in ids:
                assert await store.insert(delivery(request_id))
        finally:
            await store.stop()

    asyncio.run(insert())
    return store


def _claim_and_finish(store: Store, n: int) -> None:
    async def run() -> None:
        store.start()
        try:
            batch = await store.claim(n, lease_seconds=30)
            for claim in batch.claims:
                assert await store.finish(claim)
        finally:
            await store.stop()

    asyncio.run(run())


def test_a_drained_store_counts_as_kept_up(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    store = _store_with(url, ["a", "b"])
    _claim_and_finish(store, 2)
    result = backlog.measure(url, deadline_s=5)
    assert result["at_end"] == {"done": 2}
    assert result["done_at_end"] == 1.0
    assert result["drained"] is True
    assert backlog.problems(result) == []
    assert "100%" in backlog.summary(result)


def test_work_left_at_the_end_is_waited_for(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    store = _store_with(url, ["a", "b"])
    _claim_and_finish(store, 1)
    assert backlog.state_counts(url) == {"done": 1, "pending": 1}
    # The other delivery is dispatched while the harness waits.
    finisher = threading.Thread(target=_claim_and_finish, args=(store, 1))
    finisher.start()
    try:
        result = backlog.measure(url, deadline_s=30)
    finally:
        finisher.join()
    assert result["drained"] is True
    assert backlog.problems(result) == []
    assert result["at_end"]["done"] >= 1


def test_a_backlog_that_never_drains_makes_the_run_invalid(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    _store_with(url, ["a", "b", "c", "d"])
    result = backlog.measure(url, deadline_s=0.2)
    assert result["done_at_end"] == 0.0
    assert result["drained"] is False
    assert result["unfinished_after_deadline"] == 4
    (problem,) = backlog.problems(result)
    assert "did not catch up" in problem
    assert "4 still unfinished" in backlog.summary(result)
