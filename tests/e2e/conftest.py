"""Fixtures for the end-to-end tests: a loopback JWKS, a signer, and server processes
that are always killed at the end of the test that started them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from falhook.verify.testing import JWKSServer, KeyPair, generate_keypair
from tests.e2e.server import Sender, ServerProcess

SEED = b"\x07" * 32


@pytest.fixture(scope="session")
def fal_key() -> KeyPair:
    return generate_keypair(SEED)


@pytest.fixture(scope="session")
def jwks_server(fal_key: KeyPair) -> Iterator[JWKSServer]:
    with JWKSServer(fal_key) as server:
        yield server


@pytest.fixture(scope="session")
def sender(fal_key: KeyPair) -> Sender:
    return Sender(fal_key)


SpawnServer = Callable[..., ServerProcess]


@pytest.fixture
def spawn(tmp_path: Path, jwks_server: JWKSServer) -> Iterator[SpawnServer]:
    """``spawn(env={...}, args=[...], start=True)`` → a running `ServerProcess`."""
    servers: list[ServerProcess] = []

    def factory(*, start: bool = True, jwks: str | None = None, **kwargs: Any) -> ServerProcess:
        workdir = tmp_path / f"server{len(servers)}"
        workdir.mkdir()
        server = ServerProcess(workdir, jwks=jwks or jwks_server.url, **kwargs)
        servers.append(server)
        if start:
            server.start()
        return server

    try:
        yield factory
    finally:
        for server in servers:
            server.kill()


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30.0, follow_redirects=False) as c:
        yield c
