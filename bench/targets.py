"""The three reference receivers the benchmark measures falhook against.

All three are plain Starlette — ``Route`` plus ``await request.body()`` — because that is
what users write, and they are served by the same uvicorn flags as ``falhook serve``. Each is
built by a factory (``uvicorn --factory bench.targets:bare_app``) that reads its
configuration from the environment:

- ``BENCH_JWKS_FILE``: JWKS file whose keys are preloaded (verify-only, naive).
- ``BENCH_DB_PATH``: SQLite file for naive (created if missing).
- ``BENCH_TOLERANCE_SECONDS``: timestamp tolerance, default 300.

Every app answers ``GET /healthz`` so the harness can wait for it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import registry
from sqlmodel import Field, Session, SQLModel, create_engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

WEBHOOK_PATH = "/webhooks/fal"
_HEADERS = (
    "x-fal-webhook-request-id",
    "x-fal-webhook-user-id",
    "x-fal-webhook-timestamp",
    "x-fal-webhook-signature",
)


async def _healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


def _app(
    endpoint: Callable[[Request], Awaitable[Response]],
    lifespan: Callable[[Starlette], AbstractAsyncContextManager[None]] | None = None,
) -> Starlette:
    return Starlette(
        routes=[
            Route(WEBHOOK_PATH, endpoint, methods=["POST"]),
            Route("/healthz", _healthz, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def load_verify_keys(jwks_file: Path) -> list[VerifyKey]:
    """Every OKP/Ed25519 key in a JWKS file, ``x`` decoded with or without padding."""
    document = json.loads(jwks_file.read_text())
    keys = []
    for jwk in document.get("keys", []):
        if (
            jwk.get("kty") == "OKP"
            and jwk.get("crv") == "Ed25519"
            and isinstance(jwk.get("x"), str)
        ):
            x = jwk["x"]
            keys.append(VerifyKey(base64.urlsafe_b64decode(x + "=" * (-len(x) % 4))))
    if not keys:
        raise RuntimeError(f"no Ed25519 key in {jwks_file}")
    return keys


def _verifier(keys: list[VerifyKey], tolerance: int) -> Callable[[Request, bytes], str | None]:
    """fal's documented check; returns the request id, or None when the delivery is not valid."""

    def verify(request: Request, body: bytes) -> str | None:
        values = [request.headers.get(name) for name in _HEADERS]
        request_id, user_id, timestamp, signature = values
        if request_id is None or user_id is None or timestamp is None or signature is None:
            return None
        try:
            if abs(int(time.time()) - int(timestamp)) > tolerance:
                return None
            sig = bytes.fromhex(signature)
        except ValueError:
            return None
        digest = hashlib.sha256(body).hexdigest()
        message = f"{request_id}\n{user_id}\n{timestamp}\n{digest}".encode()
        for key in keys:
            try:
                key.verify(message, sig)
            except (BadSignatureError, ValueError):
                continue
            return request_id
        return None

    return verify


def _config() -> tuple[list[VerifyKey], int]:
    keys = load_verify_keys(Path(os.environ["BENCH_JWKS_FILE"]))
    return keys, int(os.environ.get("BENCH_TOLERANCE_SECONDS", "300"))


def bare_app() -> Starlette:
    """Read the body, answer 200: the ceiling of the stack."""

    async def receive(request: Request) -> Response:
        await request.body()
        return PlainTextResponse("ok")

    return _app(receive)


def verify_only_app() -> Starlette:
    """fal's signature check with a preloaded key, nothing stored: the floor of any verifier."""
    keys, tolerance = _config()
    verify = _verifier(keys, tolerance)

    async def receive(request: Request) -> Response:
        body = await request.body()
        request_id = verify(request, body)
        if request_id is None:
            return JSONResponse({"error": "invalid_signature"}, status_code=401)
        return JSONResponse({"request_id": request_id})

    return _app(receive)


class _NaiveBase(SQLModel, registry=registry()):
    """Own metadata, so importing the benchmark adds no table to SQLModel's global one."""


class NaiveDelivery(_NaiveBase, table=True):
    request_id: str = Field(primary_key=True)
    body: str
    status: str


def naive_app() -> Starlette:
    """What users write from fal's docs: verify, then one ORM session and commit per request.

    SQLite with default settings (rollback journal, synchronous=FULL). The session runs on
    the event loop, as it does in an ``async def`` endpoint that calls a sync ORM.
    """
    keys, tolerance = _config()
    verify = _verifier(keys, tolerance)
    engine = create_engine(f"sqlite:///{os.environ['BENCH_DB_PATH']}")
    NaiveDelivery.metadata.create_all(engine)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        engine.dispose()

    async def receive(request: Request) -> Response:
        body = await request.body()
        request_id = verify(request, body)
        if request_id is None:
            return JSONResponse({"error": "invalid_signature"}, status_code=401)
        try:
            status = json.loads(body).get("status", "")
        except ValueError:
            return JSONResponse({"error": "malformed"}, status_code=400)
        row = NaiveDelivery(request_id=request_id, body=body.decode(), status=str(status))
        try:
            with Session(engine) as session:
                session.add(row)
                session.commit()
        except IntegrityError:
            return JSONResponse({"request_id": request_id, "duplicate": True})
        return JSONResponse({"request_id": request_id, "duplicate": False})

    return _app(receive, lifespan)
