"""Fixtures for the media archive: a loopback origin standing in for fal's CDN, a real
store, and S3 through moto's server mode (a real S3 API server on loopback)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from falhook.receiver.store import Store
from tests.fakes.media_origin import MediaOrigin
from tests.fakes.s3 import s3_bucket, s3_server

__all__ = ["s3_bucket", "s3_server"]  # fixtures


@pytest.fixture
def origin() -> Iterator[MediaOrigin]:
    with MediaOrigin() as server:
        yield server


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = Store(f"sqlite:///{tmp_path / 'falhook.db'}")
    store.migrate()
    yield store
    store.engine.dispose()
