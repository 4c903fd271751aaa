"""The store's readiness probe on a real SQLite file: a commit, room on the disk, and a
verdict kept for a while."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from falhook.receiver.errors import StoreUnavailableError
from falhook.receiver.readiness import StoreProbe
from falhook.receiver.store import Store


def test_ready_when_a_write_commits_and_the_disk_has_room(tmp_path: Path) -> None:
    async def body() -> None:
        store = Store(f"sqlite:///{tmp_path / 'r.db'}")
        store.start()
        try:
            await StoreProbe(store).check()
            with pytest.raises(StoreUnavailableError, match="bytes free"):
                await StoreProbe(store, min_free=1 << 62).check()  # no disk is that big
        finally:
            await store.stop()

    asyncio.run(body())


def test_the_verdict_is_kept_and_shared(tmp_path: Path) -> None:
    async def body() -> None:
        store = Store(f"sqlite:///{tmp_path / 'r.db'}")
        store.start()
        kept, fresh = StoreProbe(store, every=3600), StoreProbe(store, every=0)
        await asyncio.gather(*(kept.check() for _ in range(5)), fresh.check())
        await store.stop()  # nothing can commit now
        await kept.check()  # still the verdict of an hour's probe
        with pytest.raises(StoreUnavailableError):
            await fresh.check()

    asyncio.run(body())
