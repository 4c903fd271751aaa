"""Shared fixtures for the verify tests: a clean FALHOOK_* environment, keys, a fake clock."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from falhook.verify import jwks
from falhook.verify.testing import KeyPair, generate_keypair


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No FALHOOK_* variable from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith("FALHOOK_"):
            monkeypatch.delenv(name)
    yield
    jwks.clear_registry()


@pytest.fixture
def keypair() -> KeyPair:
    return generate_keypair(b"\x01" * 32)


@pytest.fixture
def other_keypair() -> KeyPair:
    return generate_keypair(b"\x02" * 32)


class FakeClock:
    """A monotonic clock tests move by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
