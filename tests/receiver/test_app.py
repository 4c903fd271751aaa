"""Mounting the receiver in a host app: its lifespan must be composed, and a delivery that
arrives when it never ran gets a loud 503 receiver_not_started."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient

from falhook.receiver import Delivery, NotStartedError, Settings, WebhookReceiver, create_app
from falhook.receiver.dispatcher import Dispatcher
from falhook.receiver.intake import Intake
from falhook.receiver.keysource import KeySource
from falhook.receiver.pause import PauseWatcher
from falhook.receiver.pruner import Pruner
from falhook.receiver.recovery import Recovery
from falhook.receiver.store import Store
from falhook.receiver.store.listener import Listener
from falhook.receiver.watchdog import LoopWatchdog
from tests.receiver import store_fixtures
from tests.receiver.conftest import Signer

pg_schema_url = store_fixtures.pg_schema_url
store_url = store_fixtures.store_url


def _wait(received: list[Delivery]) -> None:
    deadline = time.monotonic() + 10
    while not received:
        assert time.monotonic() < deadline, "callback never ran"
        time.sleep(0.01)


def test_mounted_with_lifespan_hooks_lifespan(settings: Settings, signer: Signer) -> None:
    hooks = WebhookReceiver(settings)
    received: list[Delivery] = []

    @hooks.on_ok
    async def save(delivery: Delivery) -> None:
        received.append(delivery)

    host = FastAPI(lifespan=hooks.lifespan)
    host.mount("/fal", hooks.app)

    @host.get("/")
    def index() -> dict[str, str]:
        return {"app": "host"}

    with TestClient(host, follow_redirects=False) as client:
        assert client.get("/").json() == {"app": "host"}
        body, headers = signer("mounted-1")
        response = client.post("/fal/webhooks/fal", content=body, headers=headers)
        assert response.json() == {"request_id": "mounted-1", "duplicate": False}
        slash = client.post("/fal/webhooks/fal/", content=body, headers=headers)
        assert slash.json() == {"request_id": "mounted-1", "duplicate": True}
        assert client.get("/fal/readyz").json()["status"] == "ready"
        _wait(received)
    assert [d.request_id for d in received] == ["mounted-1"]
    assert not hooks.started


def test_composed_with_async_with_in_the_hosts_own_lifespan(
    settings: Settings, signer: Signer
) -> None:
    hooks = WebhookReceiver(settings)
    received: list[Delivery] = []
    hooks.on_delivery(received.append)
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        events.append("host up")
        async with hooks:
            assert hooks.started and hooks.dispatcher is not None
            yield
        events.append("host down")

    host = FastAPI(lifespan=lifespan)
    host.mount("/hooks", hooks.app)
    with TestClient(host) as client:
        body, headers = signer("composed-1")
        response = client.post("/hooks/webhooks/fal", content=body, headers=headers)
        assert response.status_code == 200
        _wait(received)
    assert events == ["host up", "host down"]
    assert not hooks.started


@pytest.mark.parametrize("kind", ["def", "async"])
def test_a_failed_callback_is_retried_when_due_not_at_the_next_poll(
    settings: Settings, signer: Signer, kind: str
) -> None:
    # As `falhook serve` runs it: the delivery is stored already claimed and its callback
    # fails at once; the retry is due in 0.3 s, the next poll only in a minute.
    slow_poll = settings.replace(
        poll_seconds=60.0, callback_backoff_seconds=0.3, callback_max_attempts=3
    )
    hooks = WebhookReceiver(slow_poll)
    attempts: list[float] = []

    def fails_twice(delivery: Delivery) -> None:
        attempts.append(time.monotonic())
        if delivery.attempt < 3:
            raise RuntimeError("downstream is down")

    async def fails_twice_async(delivery: Delivery) -> None:
        fails_twice(delivery)

    hooks.on_delivery(fails_twice if kind == "def" else fails_twice_async)
    with TestClient(hooks.app) as client:
        body, headers = signer(f"retried-{kind}")
        assert client.post("/webhooks/fal", content=body, headers=headers).status_code == 200
        deadline = time.monotonic() + 15
        while len(attempts) < 3:
            assert time.monotonic() < deadline, f"{len(attempts)} attempts after 15 s"
            time.sleep(0.01)
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    # Backoff with jitter: 0.15-0.3 s, then 0.3-0.6 s; a poll would have taken 60 s.
    assert 0.1 <= gaps[0] < 5 and 0.25 <= gaps[1] < 5, gaps


def test_503_receiver_not_started_when_the_lifespan_never_ran(
    settings: Settings, signer: Signer, caplog: pytest.LogCaptureFixture
) -> None:
    hooks = WebhookReceiver(settings)
    hooks.on_delivery(lambda d: None)
    host = FastAPI()  # forgot lifespan=hooks.lifespan
    host.mount("/fal", hooks.app)
    with TestClient(host) as client, caplog.at_level(logging.ERROR, "falhook.receiver"):
        body, headers = signer("never-started")
        response = client.post("/fal/webhooks/fal", content=body, headers=headers)
        assert response.status_code == 503
        assert response.json()["error"] == "receiver_not_started"
        ready = client.get("/fal/readyz")
        assert ready.status_code == 503
        assert ready.json()["error"] == "receiver_not_started"
        assert client.get("/fal/healthz").status_code == 200
    assert any("lifespan" in r.getMessage() for r in caplog.records)


def test_nested_starts_are_counted(settings: Settings) -> None:
    hooks = WebhookReceiver(settings)

    async def main() -> None:
        async with hooks:
            async with hooks:
                assert hooks.started
            assert hooks.started  # the inner exit does not stop it
        assert not hooks.started

    asyncio.run(main())


def test_create_app_exposes_the_receiver(settings: Settings, signer: Signer) -> None:
    received: list[Delivery] = []
    app = create_app(settings, callbacks=[received.append])
    assert isinstance(app.state.falhook, WebhookReceiver)
    with TestClient(app) as client:
        body, headers = signer("factory-1")
        assert client.post("/webhooks/fal", content=body, headers=headers).status_code == 200
        _wait(received)


def test_without_callbacks_deliveries_stay_pending(settings: Settings, signer: Signer) -> None:
    hooks = WebhookReceiver(settings)
    with TestClient(hooks.app) as client:
        body, headers = signer("pending-1")
        assert client.post("/webhooks/fal", content=body, headers=headers).status_code == 200
        assert hooks.dispatcher is None
        row = hooks.store.get("pending-1")
        assert row is not None and row.state.value == "pending"


def test_store_and_keys_before_start_raise_not_started(settings: Settings) -> None:
    hooks = WebhookReceiver(settings)
    with pytest.raises(NotStartedError):
        _ = hooks.store
    with pytest.raises(NotStartedError):
        _ = hooks.keys
    # A scrape before the lifespan ran still answers, without the store's numbers.
    body = hooks.metrics.render().decode()
    assert "falhook_deliveries_received_total" in body
    assert "falhook_oldest_pending_age_seconds" not in body


def test_the_startup_line_masks_the_store_password() -> None:
    from falhook.receiver.settings import without_password

    for password in ("s3cret", "a/b:c"):  # SQLAlchemy reads a password up to the "@"
        url = f"postgresql+psycopg://falhook:{password}@db.internal:5432/falhook"
        assert without_password(url) == "postgresql+psycopg://falhook:***@db.internal:5432/falhook"
    for url in ("sqlite:///./falhook.db", "postgresql://db.internal:5432/falhook"):
        assert without_password(url) == url


def test_the_startup_line_names_a_relative_store_file_and_the_console(
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.chdir(tmp_path)
    relative = settings.replace(database_url="sqlite:///./here.db", console_token="t" * 32)
    hooks = WebhookReceiver(relative, listen="http://127.0.0.1:8000")
    with caplog.at_level(logging.INFO, logger="falhook.receiver"), TestClient(hooks.app):
        pass
    started = next(r for r in caplog.records if "started" in r.getMessage())
    assert started.store == f"sqlite:///./here.db ({tmp_path.resolve() / 'here.db'})"  # type: ignore[attr-defined]
    assert started.console == "http://127.0.0.1:8000/console/"  # type: ignore[attr-defined]
    assert started.getMessage().endswith(", console http://127.0.0.1:8000/console/")


class _InjectedError(Exception):
    pass


# Every step of start, in order (the listener only on PostgreSQL); the startup line last.
_START_STEPS = [
    (LoopWatchdog, "start"),
    (KeySource, "__init__"),
    (WebhookReceiver, "_start_notifier"),
    (Store, "start"),
    (Store, "ping"),
    (PauseWatcher, "start"),
    (Listener, "start"),
    (Dispatcher, "start"),
    (Intake, "__init__"),
    (WebhookReceiver, "_start_sampler"),
    (Pruner, "start"),
    (Recovery, "start"),
    (WebhookReceiver, "_log_started"),
]


async def _no_thread_left_but(before: set[threading.Thread]) -> None:
    # Checked while the loop still runs: a thread bound to it would otherwise end with it.
    # A stopped thread may take a moment to end (the watchdog notices within a probe).
    for thread in _falhook_threads() - before:
        await asyncio.to_thread(thread.join, 10)
    left = _falhook_threads() - before
    assert not left, sorted(t.name for t in left)
    assert asyncio.all_tasks() == {asyncio.current_task()}


def _falhook_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("falhook-")}


@pytest.mark.parametrize("after", [False, True], ids=["instead", "after"])
@pytest.mark.parametrize(("cls", "step"), _START_STEPS, ids=lambda v: getattr(v, "__name__", v))
def test_a_failed_start_stops_what_it_started_and_a_later_start_works(
    store_url: str,
    jwks_file: Path,
    cls: type,
    step: str,
    after: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The step fails instead of running, or once it ran (a part that fails halfway).
    if cls is Listener and not store_url.startswith("postgresql"):
        pytest.skip("the listener runs only on PostgreSQL")
    settings = Settings(
        database_url=store_url,
        jwks_url=str(jwks_file),
        forward_to="http://127.0.0.1:9/in",  # a callback: the dispatcher runs
        fal_key="key",  # recovery runs (nothing is expected: it calls nobody)
        queue_url="http://127.0.0.1:9",
        notify_url="http://127.0.0.1:9/notify",  # the notifier runs (nothing to tell)
        console_token="t" * 32,  # the console's chart sampler runs
        shutdown_timeout_seconds=1.0,
    )
    before = _falhook_threads()
    hooks = WebhookReceiver(settings)

    original = getattr(cls, step)

    def fail(*args: Any, **kwargs: Any) -> None:
        if after:
            original(*args, **kwargs)
        raise _InjectedError(f"{cls.__name__}.{step}")

    async def fail_async(*args: Any, **kwargs: Any) -> None:
        if after:
            await original(*args, **kwargs)
        raise _InjectedError(f"{cls.__name__}.{step}")

    monkeypatch.setattr(cls, step, fail_async if inspect.iscoroutinefunction(original) else fail)

    async def main() -> None:
        with pytest.raises(_InjectedError):
            await hooks.start()
        assert not hooks.started
        await _no_thread_left_but(before)
        with pytest.raises(NotStartedError):
            _ = hooks.store
        assert hooks.app.endpoint.intake is None  # deliveries get 503 receiver_not_started
        monkeypatch.setattr(cls, step, original)
        async with hooks:  # a later start works
            assert hooks.started and hooks.dispatcher is not None
            await hooks.store.ping()
            assert (await hooks.pause("test")).paused
        assert not hooks.started
        await _no_thread_left_but(before)

    asyncio.run(main())
