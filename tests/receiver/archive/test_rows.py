"""The media rows on both databases: recorded once per (request_id, pointer)."""

from __future__ import annotations

import asyncio

from falhook.receiver.archive import MediaRows, MediaState
from falhook.receiver.store import Store
from tests.receiver.store_fixtures import pg_schema_url, store_url  # noqa: F401


def test_rows_are_recorded_once_and_counted(store_url: str) -> None:  # noqa: F811
    store = Store(store_url)
    store.migrate()
    rows = MediaRows(store.engine)
    try:
        found = [("/a", "https://fal.media/a"), ("/b/10", "https://fal.media/b"), ("/b/2", "x")]
        first = asyncio.run(rows.ensure("r1", found))
        again = asyncio.run(rows.ensure("r1", found))
        assert first == again and set(first) == {"/a", "/b/10", "/b/2"}
        asyncio.run(
            rows.record("r1", "/a", MediaState.ARCHIVED, tries=2, stored_url="file:///x", size=3)
        )
        asyncio.run(rows.record("r1", "/b/2", MediaState.FAILED, tries=1, error="not_found: 404"))
        items = asyncio.run(rows.items("r1"))
        assert [i.pointer for i in items] == ["/a", "/b/2", "/b/10"]  # payload order
        counts = rows.counts()
        assert counts.states[MediaState.PENDING] == 1 and counts.states[MediaState.ARCHIVED] == 1
        assert counts.oldest_pending_age >= 0
        assert rows.retry("r1") == 1
        assert [i.state for i in rows.get("r1")][1] is MediaState.PENDING
        assert [rid for rid, _ in rows.find(state=MediaState.ARCHIVED)] == ["r1"]
    finally:
        store.engine.dispose()
