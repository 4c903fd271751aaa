"""Fixtures shared by every test package: a clean FALHOOK_* environment and a test key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from falhook.verify.testing import KeyPair, generate_keypair, jwks_document


@pytest.fixture(autouse=True)
def _clean_falhook_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No FALHOOK_* variable from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("FALHOOK_"):
            monkeypatch.delenv(name)


@pytest.fixture
def keypair() -> KeyPair:
    """A deterministic Ed25519 key pair (the "fal" signing key of the tests)."""
    return generate_keypair(b"\x01" * 32)


@pytest.fixture
def jwks_file(tmp_path: Path, keypair: KeyPair) -> Path:
    """A local JWKS file holding `keypair`'s public key."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks_document(keypair)), encoding="utf-8")
    return path
