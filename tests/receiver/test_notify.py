"""Notifier: batched per kind, retried, signed, against a real loopback HTTP receiver."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks import Webhook
from starlette.testclient import TestClient

from falhook.receiver import Settings, WebhookReceiver
from falhook.receiver.notify import NoticeKind, Notifier
from tests.receiver.conftest import Signer

SECRET = "whsec_" + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="


class Inbox:
    """A loopback receiver: records each POST; answers the queued statuses, then 200."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, str], bytes, float]] = []
        self.answers: list[int] = []
        self.lock = threading.Lock()
        inbox = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with inbox.lock:
                    status = inbox.answers.pop(0) if inbox.answers else 200
                    inbox.posts.append(
                        ({k.lower(): v for k, v in self.headers.items()}, body, time.monotonic())
                    )
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def texts(self) -> list[str]:
        with self.lock:
            return [json.loads(body)["text"] for _, body, _ in self.posts]


@pytest.fixture
def inbox() -> Iterator[Inbox]:
    box = Inbox()
    yield box
    box.server.shutdown()
    box.server.server_close()


async def _until(check: object) -> None:
    deadline = time.monotonic() + 10.0
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


def _run(notifier: Notifier, body: object) -> None:
    async def main() -> None:
        task = asyncio.create_task(notifier.run())
        try:
            await body(notifier)  # type: ignore[operator]
        finally:
            await notifier.aclose()
            await task

    asyncio.run(main())


def test_first_event_goes_at_once_and_a_burst_is_one_message(inbox: Inbox) -> None:
    interval = 0.5

    async def body(notifier: Notifier) -> None:
        notifier.notify(NoticeKind.DELIVERY_DEAD, "req-1", "Traceback…\nValueError: boom")
        await _until(lambda: len(inbox.posts) == 1)
        for n in range(2, 12):
            notifier.notify(NoticeKind.DELIVERY_DEAD, f"req-{n}")
        await _until(lambda: len(inbox.posts) == 2)

    _run(Notifier(inbox.url, interval=interval, console_url="https://hooks.example/console"), body)
    first, second = inbox.texts()
    assert first.startswith("falhook: 1 delivery went dead")
    assert "req-1 https://hooks.example/console/deliveries/req-1: ValueError: boom" in first
    assert "https://hooks.example/console/?state=dead" in first
    assert second.startswith("falhook: 10 deliveries went dead")
    assert "… and 5 more" in second  # five named, the rest counted
    # The burst waited for the kind's interval, however fast it came.
    assert inbox.posts[1][2] - inbox.posts[0][2] >= interval * 0.9


def test_kinds_are_batched_apart(inbox: Inbox) -> None:
    async def body(notifier: Notifier) -> None:
        notifier.notify(NoticeKind.DELIVERY_DEAD, "req-1")
        notifier.notify(NoticeKind.EXPECTATION_EXPIRED, "req-2")
        notifier.notify(NoticeKind.MEDIA_FAILED, "https://v3.fal.media/files/a.png", "too_large")
        await _until(lambda: len(inbox.posts) == 3)

    _run(Notifier(inbox.url, interval=60), body)
    texts = sorted(inbox.texts())
    assert texts == [
        "falhook: 1 delivery went dead\n• req-1",
        "falhook: 1 expected result expired without arriving\n• req-2",
        "falhook: 1 file could not be archived\n• https://v3.fal.media/files/a.png: too_large",
    ]


def test_a_failed_post_is_retried_and_counted(inbox: Inbox) -> None:
    inbox.answers = [500, 503]
    outcomes: list[tuple[NoticeKind, str]] = []

    async def body(notifier: Notifier) -> None:
        notifier.notify(NoticeKind.EXPECTATION_FAILED, "req-9", "fal answered 422")
        await _until(lambda: "sent" in [o for _, o in outcomes])

    notifier = Notifier(
        inbox.url, interval=60, retry_delay=0.02, on_sent=lambda k, o: outcomes.append((k, o))
    )
    _run(notifier, body)
    assert [o for _, o in outcomes] == ["retried", "retried", "sent"]
    assert len(set(inbox.texts())) == 1 and len(inbox.posts) == 3


def test_a_receiver_that_stays_down_does_not_pile_up(inbox: Inbox) -> None:
    inbox.answers = [500] * 1000
    outcomes: list[str] = []

    async def body(notifier: Notifier) -> None:
        notifier.notify(NoticeKind.DELIVERY_DEAD, "req-1")
        await _until(lambda: "dropped" in outcomes)

    _run(
        Notifier(
            inbox.url, interval=0.2, retry_delay=0.05, on_sent=lambda k, o: outcomes.append(o)
        ),
        body,
    )
    assert outcomes[-1] == "dropped" and "sent" not in outcomes


def test_signed_with_standard_webhooks(inbox: Inbox) -> None:
    async def body(notifier: Notifier) -> None:
        notifier.notify(NoticeKind.DELIVERY_DEAD, "req-1")
        await _until(lambda: len(inbox.posts) == 1)

    _run(Notifier(inbox.url, secret=SECRET), body)
    [(headers, raw, _)] = inbox.posts
    Webhook(SECRET).verify(raw, headers)  # raises if the signature does not hold
    assert headers["webhook-id"].startswith("msg_")


def test_pending_events_are_sent_at_close(inbox: Inbox) -> None:
    async def body(notifier: Notifier) -> None:
        notifier.notify(NoticeKind.DELIVERY_DEAD, "req-1")
        await _until(lambda: len(inbox.posts) == 1)
        notifier.notify(NoticeKind.DELIVERY_DEAD, "req-2")  # waits for the interval…

    _run(Notifier(inbox.url, interval=3600), body)  # …but stopping sends it
    assert inbox.texts()[1] == "falhook: 1 delivery went dead\n• req-2"


def test_a_receiver_tells_when_a_delivery_goes_dead(
    inbox: Inbox, settings: Settings, signer: Signer
) -> None:
    hooks = WebhookReceiver(
        settings.replace(
            notify_url=inbox.url,
            callback_max_attempts=1,
            console_token="t" * 32,
            public_url="https://hooks.example",
        )
    )

    @hooks.on_delivery
    def broken(delivery: object) -> None:
        raise RuntimeError("downstream is down")

    with TestClient(hooks.app) as client:
        body, headers = signer("r-dead")
        assert client.post("/webhooks/fal", content=body, headers=headers).status_code == 200
        deadline = time.monotonic() + 20
        while not inbox.posts:
            assert time.monotonic() < deadline, "no notification"
            time.sleep(0.02)
        metrics = client.get("/metrics").text
    [text] = inbox.texts()
    assert text.startswith("falhook: 1 delivery went dead\n")
    assert (
        "r-dead https://hooks.example/console/deliveries/r-dead: RuntimeError: downstream" in text
    )
    assert 'falhook_notifications_total{kind="delivery_dead",outcome="sent"} 1.0' in metrics


def test_a_huge_answer_is_not_read(caplog: pytest.LogCaptureFixture) -> None:
    """Only the status counts: a target answering a gigabyte gives up a few megabytes
    (what the sockets buffer) before the connection is closed; its URL's token is not
    logged when it fails."""
    sent = [0]
    finished = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            status = 200 if self.path == "/ok" else 500
            self.send_response(status)
            self.send_header("content-length", str(1024**3))
            self.end_headers()
            try:
                for _ in range(1024):
                    self.wfile.write(b"\0" * 1024**2)
                    sent[0] += 1024**2
            except OSError:
                pass
            finally:
                finished.set()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    outcomes: list[str] = []
    try:
        for path, outcome in (("/ok", "sent"), ("/down?token=SECRET", "dropped")):
            finished.clear()
            sent[0] = 0

            async def body(notifier: Notifier, outcome: str = outcome) -> None:
                notifier.notify(NoticeKind.DELIVERY_DEAD, "req-1")
                await _until(lambda: outcome in outcomes)

            notifier = Notifier(
                base + path,
                interval=0.2,
                retry_delay=0.5,
                on_sent=lambda kind, o: outcomes.append(o),
            )
            _run(notifier, body)
            assert finished.wait(10)
            assert sent[0] < 256 * 1024**2, sent[0]
    finally:
        server.shutdown()
        server.server_close()
    warnings = " ".join(r.getMessage() for r in caplog.records if r.name == "falhook.notify")
    assert "/down?token=***" in warnings and "SECRET" not in warnings
