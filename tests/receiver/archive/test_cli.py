"""``falhook media list|retry`` and ``deliveries show``'s files, on a real SQLite store."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from falhook.receiver import Settings
from falhook.receiver.archive import Archiver, MediaRows, MediaState
from falhook.receiver.models import Delivery
from falhook.receiver.store import Store
from tests.fakes.media_origin import MediaOrigin
from tests.receiver.store_fixtures import delivery
from tests.receiver.test_cli_errors import falhook_cli, one_line


def _seed(store: Store, origin: MediaOrigin, folder: Path) -> str:
    """A stored delivery with two files: one archived, one skipped (its host was off the
    list when it was archived)."""
    body = json.dumps(
        {
            "request_id": "m1",
            "status": "OK",
            "payload": {
                "image": {"url": f"{origin.url}/files/a.png?size=500"},
                "other": f"http://localhost:{origin.port}/files/b.png?size=700",
            },
        }
    ).encode()

    async def seed() -> None:
        store.start()
        try:
            await store.insert(delivery("m1", body=body))
        finally:
            await store.stop()
        settings = Settings(archive_url=str(folder), archive_hosts=(origin.host,))
        archiver = Archiver(settings, MediaRows(store.engine))
        try:
            parsed = Delivery.from_body(body, attempt=1, received_at=time.time())
            await archiver.archive(parsed)
        finally:
            await archiver.aclose()

    asyncio.run(seed())
    return str(store.url)


@pytest.fixture
def seeded(store: Store, origin: MediaOrigin, tmp_path: Path) -> str:
    return _seed(store, origin, tmp_path / "media")


def test_media_list_shows_each_file_and_filters(seeded: str, tmp_path: Path) -> None:
    result = falhook_cli("media", "list", "--json", "--database-url", seeded, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    files = json.loads(result.stdout)
    assert [(f["request_id"], f["pointer"], f["state"]) for f in files] == [
        ("m1", "/image/url", "archived"),
        ("m1", "/other", "skipped"),
    ]
    assert set(files[0]) == {
        "request_id",
        "pointer",
        "source_url",
        "stored_url",
        "state",
        "error",
        "sha256",
        "size",
        "content_type",
    }
    table = falhook_cli(
        "media", "list", "--state", "skipped", "--database-url", seeded, cwd=tmp_path
    )
    assert table.returncode == 0
    assert "/other" in table.stdout and "/image/url" not in table.stdout
    none = falhook_cli("media", "list", "--request-id", "x", "--database-url", seeded, cwd=tmp_path)
    assert none.stdout.strip() == "no files match"


def test_deliveries_show_lists_the_files(seeded: str, tmp_path: Path) -> None:
    text = falhook_cli("deliveries", "show", "m1", "--database-url", seeded, cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "files:" in text.stdout and "/image/url" in text.stdout and "archived" in text.stdout
    data = falhook_cli("deliveries", "show", "m1", "--json", "--database-url", seeded, cwd=tmp_path)
    media = json.loads(data.stdout)["media"]
    assert [m["state"] for m in media] == ["archived", "skipped"]


def test_media_retry_archives_what_was_skipped_and_fetches_nothing_archived(
    seeded: str, origin: MediaOrigin, store: Store, tmp_path: Path
) -> None:
    folder = tmp_path / "media"
    env = {
        "FALHOOK_ARCHIVE_URL": str(folder),
        "FALHOOK_ARCHIVE_HOSTS": f"{origin.host},localhost:{origin.port}",
    }
    result = falhook_cli("media", "retry", "m1", "--database-url", seeded, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert origin.count("/files/a.png") == 1 and origin.count("/files/b.png") == 1
    states = [item.state for item in MediaRows(store.engine).get("m1")]
    assert states == [MediaState.ARCHIVED, MediaState.ARCHIVED]


def test_media_retry_mistakes_are_one_line(seeded: str, tmp_path: Path) -> None:
    off = falhook_cli("media", "retry", "m1", "--database-url", seeded, cwd=tmp_path)
    one_line(off, 2, "the archive is off")
    env = {"FALHOOK_ARCHIVE_URL": str(tmp_path / "m")}
    missing = falhook_cli("media", "retry", "nope", "--database-url", seeded, cwd=tmp_path, env=env)
    one_line(missing, 1, "no delivery 'nope'")
    bad = falhook_cli("media", "list", "--state", "lost", "--database-url", seeded, cwd=tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
