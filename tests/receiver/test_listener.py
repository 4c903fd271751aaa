"""The LISTEN/NOTIFY listener on real PostgreSQL: wakes on inserts, survives killed sessions."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import sqlalchemy as sa

from falhook.receiver.store import Store
from falhook.receiver.store.listener import Listener, libpq_conninfo
from tests.receiver import store_fixtures
from tests.receiver.store_fixtures import delivery, pg_admin

pg_schema_url = store_fixtures.pg_schema_url
pytestmark = pytest.mark.postgres


def test_conninfo_drops_the_driver_name() -> None:
    assert libpq_conninfo("postgresql+psycopg://u:p@h:5433/db?options=-csearch_path%3Dx") == (
        "postgresql://u:p@h:5433/db?options=-csearch_path%3Dx"
    )


class Wakes:
    def __init__(self) -> None:
        self.count = 0
        self.event = asyncio.Event()

    def __call__(self) -> None:
        self.count += 1
        self.event.set()

    async def next(self, seconds: float = 10) -> None:
        await asyncio.wait_for(self.event.wait(), seconds)
        self.event.clear()


@contextlib.asynccontextmanager
async def listening(url: str, wakes: Wakes) -> AsyncIterator[Listener]:
    listener = Listener(url, wakes, poll_interval=0.1, max_backoff=0.5)
    listener.start()
    try:
        await asyncio.to_thread(listener.connected.wait, 10)
        await wakes.next()  # the wake after connecting
        yield listener
    finally:
        await listener.stop()


def _terminate_listener() -> int:
    with pg_admin().connect() as conn:
        return len(
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND query LIKE 'LISTEN %'"
                )
            ).all()
        )


def test_another_stores_insert_wakes_the_listener(pg_schema_url: str) -> None:
    async def body() -> None:
        wakes = Wakes()
        other = Store(pg_schema_url)  # another replica's store
        other.start()
        try:
            await other.ping()
            async with listening(pg_schema_url, wakes) as listener:
                assert await other.insert(delivery("a")) is True
                await wakes.next()
                assert listener.notifications >= 1
                # Claims and duplicates notify nobody (no ping-pong between replicas).
                seen = listener.notifications
                assert await other.insert(delivery("a")) is False
                await other.claim(10, 30)
                await other.ping()
                await asyncio.sleep(0.5)
                assert listener.notifications == seen
        finally:
            await other.stop()

    asyncio.run(body())


def test_listener_reconnects_after_its_session_is_killed(pg_schema_url: str) -> None:
    async def body() -> None:
        wakes = Wakes()
        other = Store(pg_schema_url)
        other.start()
        try:
            await other.ping()
            async with listening(pg_schema_url, wakes) as listener:
                for round_ in range(2):
                    assert _terminate_listener() == 1
                    await wakes.next()  # the reconnect wakes (notifies may have been missed)
                    await asyncio.to_thread(listener.connected.wait, 10)
                    assert listener.connects == round_ + 2
                    await other.insert(delivery(f"after-{round_}"))
                    await wakes.next()
        finally:
            await other.stop()

    asyncio.run(body())
