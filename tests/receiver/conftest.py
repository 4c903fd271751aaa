"""Fixtures for the in-process receiver tests: settings on a fresh SQLite file and a
local JWKS file, and a signer for deliveries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from falhook.receiver import Settings
from falhook.verify.testing import KeyPair, fal_body, sign

USER_ID = "user-test"


class Signer:
    """Builds fal-shaped bodies and signs them as fal would."""

    def __init__(self, keypair: KeyPair, user_id: str = USER_ID) -> None:
        self.keypair = keypair
        self.user_id = user_id

    def __call__(
        self, request_id: str, body: bytes | None = None, **fields: Any
    ) -> tuple[bytes, dict[str, str]]:
        body = fal_body(request_id, **fields) if body is None else body
        return body, sign(body, request_id, self.user_id, keypair=self.keypair)


@pytest.fixture
def signer(keypair: KeyPair) -> Signer:
    return Signer(keypair)


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'falhook.db'}"


@pytest.fixture
def settings(db_url: str, jwks_file: Path) -> Settings:
    """Fast settings for in-process receivers (short backoff, lease and poll)."""
    return Settings(
        database_url=db_url,
        jwks_url=str(jwks_file),
        callback_backoff_seconds=0.05,
        lease_seconds=5.0,
        poll_seconds=0.5,
        shutdown_timeout_seconds=5.0,
    )
