"""Purge at fal against a loopback fake of fal's platform API: only once every file is
archived, once, with the admin key and an Idempotency-Key; retried when fal cannot answer."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from falhook.receiver import Settings
from falhook.receiver.archive import Archiver, MediaRows
from falhook.receiver.models import Delivery
from falhook.receiver.store import Store
from tests.fakes.fal_platform import FakeFalPlatform
from tests.fakes.media_origin import MediaOrigin


@pytest.fixture
def platform() -> Iterator[FakeFalPlatform]:
    with FakeFalPlatform() as server:
        yield server


def _run(store: Store, settings: Settings, payload: Any, request_id: str) -> None:
    body = json.dumps({"request_id": request_id, "status": "OK", "payload": payload}).encode()

    async def main() -> None:
        archiver = Archiver(settings, MediaRows(store.engine), first_backoff=0.01)
        try:
            delivery = Delivery.from_body(body, attempt=1, received_at=time.time())
            await archiver.archive(delivery, last_attempt=True)
        finally:
            await archiver.aclose()

    asyncio.run(main())


def _settings(origin: MediaOrigin, platform: FakeFalPlatform, folder: Path) -> Settings:
    return Settings(
        archive_url=str(folder),
        archive_hosts=(origin.host,),
        fal_purge=True,
        fal_key="fal-key",
        fal_admin_key="admin-key",
        platform_url=platform.url,
    )


def test_purged_once_every_file_is_archived_and_only_once(
    store: Store, origin: MediaOrigin, platform: FakeFalPlatform, tmp_path: Path
) -> None:
    settings = _settings(origin, platform, tmp_path)
    payload = {"image": {"url": f"{origin.url}/files/p.png?size=10"}}
    _run(store, settings, payload, "purge-1")
    _run(store, settings, payload, "purge-1")  # a duplicate or replay: nothing again
    calls = platform.purges("purge-1")
    assert len(calls) == 1
    assert calls[0].authorization == "Key admin-key"
    assert calls[0].idempotency_key == "falhook-purge-purge-1"
    assert MediaRows(store.engine).purge("purge-1") == ("purged", None)


def test_never_purged_when_a_file_was_not_archived(
    store: Store, origin: MediaOrigin, platform: FakeFalPlatform, tmp_path: Path
) -> None:
    settings = _settings(origin, platform, tmp_path)
    payload = {"ok": f"{origin.url}/files/a.png", "gone": f"{origin.url}/status/404/b.png"}
    _run(store, settings, payload, "purge-2")
    skipped = {"ok": f"{origin.url}/files/a.png", "foreign": "https://example.com/c.png"}
    _run(store, settings, skipped, "purge-3")
    assert platform.purges("purge-2") == [] and platform.purges("purge-3") == []
    assert MediaRows(store.engine).purge("purge-2") is None


def test_a_purge_fal_cannot_answer_is_retried_then_recorded_failed(
    store: Store, origin: MediaOrigin, platform: FakeFalPlatform, tmp_path: Path
) -> None:
    settings = _settings(origin, platform, tmp_path)
    platform.answers["purge-4"] = [503, 200]
    _run(store, settings, [f"{origin.url}/files/d.png"], "purge-4")
    assert len(platform.purges("purge-4")) == 2
    platform.answers["purge-5"] = [403]
    _run(store, settings, [f"{origin.url}/files/e.png"], "purge-5")
    assert len(platform.purges("purge-5")) == 1  # a 403 is not asked again
    state = MediaRows(store.engine).purge("purge-5")
    assert state is not None and state[0] == "failed" and "403" in (state[1] or "")


def test_purge_settings_are_checked_at_start() -> None:
    from falhook.receiver import SettingsError

    with pytest.raises(SettingsError, match="needs FALHOOK_ARCHIVE_URL"):
        Settings.from_env({"FALHOOK_FAL_PURGE": "true", "FALHOOK_FAL_KEY": "k"})
    with pytest.raises(SettingsError, match="FALHOOK_FAL_ADMIN_KEY"):
        Settings.from_env({"FALHOOK_FAL_PURGE": "true", "FALHOOK_ARCHIVE_URL": "/tmp/m"})
    fallback = Settings(archive_url="/tmp/m", fal_purge=True, fal_key="k")
    assert fallback.purge_key == "k"
