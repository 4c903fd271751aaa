"""``falhook demo``: the whole path, offline, in a few seconds.

A receiver on a free loopback port (uvicorn, in this process), a temporary SQLite store,
a fresh signing key whose JWKS is served on loopback, and callbacks that print what they
get. It sends genuine, duplicate, forged, tampered, stale and mis-addressed deliveries and
shows what happened to each; then it submits a request through falhook to a local
stand-in for fal's queue (demo_queue.py) whose webhook never comes, and shows the result
recovered from the queue, with the late webhook a duplicate. Nothing touches
./falhook.db or the network.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, TextIO

import httpx

from falhook.receiver.app import WebhookReceiver
from falhook.receiver.demo_queue import DemoQueue
from falhook.receiver.durations import format_time
from falhook.receiver.models import Delivery, State
from falhook.receiver.settings import WEBHOOK_PATH, Settings
from falhook.receiver.tables import render_table
from falhook.verify.testing import JWKSServer, KeyPair, fal_body, generate_keypair, sign

__all__ = ["run"]

USER_ID = "demo-user"
DEMO_ENDPOINT = "fal-ai/flux/dev"
DEMO_FAL_KEY = "demo-fal-key"  # only the in-process stand-in for fal's queue checks it
OK_ID = "demo-ok-1"
ERROR_ID = "demo-error-1"


class DemoFailedError(Exception):
    """Something the demo waits for did not happen in time."""


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    """Only errors from falhook and uvicorn, as short plain lines (the demo narrates the rest)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("  [log] %(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in ("falhook", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.level, logger.propagate))
        logger.handlers[:] = [handler]
        logger.setLevel(logging.ERROR)
        logger.propagate = False
    try:
        yield
    finally:
        for logger, handlers, level, propagate in saved:
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate


class _Demo:
    def __init__(self, out: TextIO, timeout: float) -> None:
        self.out = out
        self.cdn: str | None = None  # the stand-in for fal's media CDN, when archiving
        self.deadline = time.monotonic() + timeout
        self.ok_seen = asyncio.Event()
        self.recovered = asyncio.Event()
        self.error_done = asyncio.Event()
        self.calls: dict[str, int] = {}
        self.heard: list[str] = []  # callback lines, printed after the answer they follow

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def heard_now(self) -> None:
        lines, self.heard = self.heard, []
        for line in lines:
            self.say(line)

    async def wait(self, event: asyncio.Event, what: str) -> None:
        remaining = self.deadline - time.monotonic()
        try:
            await asyncio.wait_for(event.wait(), max(remaining, 0.0))
        except TimeoutError:
            raise DemoFailedError(f"timed out waiting for {what}") from None
        self.heard_now()

    # -- the callbacks a user would write ------------------------------------------------

    async def on_ok(self, delivery: Delivery) -> None:
        self.calls[delivery.request_id] = self.calls.get(delivery.request_id, 0) + 1
        images = len((delivery.payload or {}).get("images", []))
        self.heard.append(
            f"   callback on_ok({delivery.request_id}): status OK, {images} image(s), "
            f"attempt {delivery.attempt}, source {delivery.source}"
        )
        for item in delivery.media:
            where = item.stored_url or item.error
            self.heard.append(
                f"     its file {item.pointer}: {item.state} → {where}"
                + (f" ({item.size} bytes, sha256 {item.sha256[:12]}…)" if item.sha256 else "")
            )
        if delivery.source == "queue":
            self.recovered.set()
        else:
            self.ok_seen.set()

    async def on_error(self, delivery: Delivery) -> None:
        if delivery.attempt == 1:
            self.heard.append(
                f"   callback on_error({delivery.request_id}): attempt 1 raises "
                "(your database is down, say) — falhook will retry it"
            )
            raise RuntimeError("database is down (simulated)")
        self.heard.append(
            f"   callback on_error({delivery.request_id}): error {delivery.error!r}, "
            f"attempt {delivery.attempt} — succeeded"
        )
        self.error_done.set()

    # -- the story -----------------------------------------------------------------------

    async def post(
        self,
        client: httpx.AsyncClient,
        url: str,
        body: bytes,
        request_id: str,
        *,
        keypair: KeyPair,
        user_id: str = USER_ID,
        timestamp: int | None = None,
        send_body: bytes | None = None,
    ) -> None:
        headers = sign(body, request_id, user_id, timestamp, keypair=keypair)
        headers["content-type"] = "application/json"
        response = await client.post(url, content=send_body or body, headers=headers)
        data: dict[str, Any] = response.json()
        if response.status_code == 200:
            note = "duplicate — stored once already" if data.get("duplicate") else "stored"
            self.say(f"   → {response.status_code} {note}")
        else:
            self.say(
                f"   → {response.status_code} rejected: {data.get('error')} ({data.get('detail')})"
            )

    async def story(self, url: str, hooks: WebhookReceiver, keypair: KeyPair) -> None:
        say = self.say
        attacker = generate_keypair()
        ok_body = fal_body(OK_ID)
        if self.cdn is not None:
            image = {"url": f"{self.cdn}/files/dog.png", "content_type": "image/png"}
            ok_body = fal_body(OK_ID, payload={"images": [image], "prompt": "dog"})
        async with httpx.AsyncClient(timeout=10, follow_redirects=False) as client:
            say("1. A successful result (status OK), signed the way fal signs it")
            if self.cdn is not None:
                say("   (its image is kept in your archive before the callback runs)")
            await self.post(client, url, ok_body, OK_ID, keypair=keypair)
            await self.wait(self.ok_seen, "the OK callback")
            say()

            say("2. A failed model run (status ERROR); the callback fails once, then succeeds")
            error_body = fal_body(
                ERROR_ID,
                status="ERROR",
                payload={"detail": [{"loc": ["body", "prompt"], "msg": "field required"}]},
                error="Invalid status code: 422",
            )
            await self.post(client, url, error_body, ERROR_ID, keypair=keypair)
            await self.wait(self.error_done, "the ERROR callback's retry")
            say()

            say("3. The OK result again, freshly signed (fal retries; duplicates happen)")
            await self.post(client, url, ok_body, OK_ID, keypair=keypair)
            say(f"   callback on_ok ran {self.calls.get(OK_ID, 0)} time(s) in all for {OK_ID}")
            say()

            say("4. A forged delivery: signed with a key that is not in fal's JWKS")
            forged = fal_body("demo-forged-1")
            await self.post(client, url, forged, "demo-forged-1", keypair=attacker)
            say()

            say("5. A tampered delivery: genuinely signed, then the body was changed")
            signed = fal_body("demo-tampered-1")
            changed = signed.replace(b'"dog"', b'"cat"')  # the prompt
            await self.post(
                client, url, signed, "demo-tampered-1", keypair=keypair, send_body=changed
            )
            say()

            say("6. A captured delivery sent again an hour later (stale timestamp)")
            stale = fal_body("demo-stale-1")
            old = int(time.time()) - 3600
            await self.post(client, url, stale, "demo-stale-1", keypair=keypair, timestamp=old)
            say()

            say(f"7. A genuine delivery for another fal user (this receiver pins {USER_ID!r})")
            other = fal_body("demo-other-user-1")
            await self.post(
                client, url, other, "demo-other-user-1", keypair=keypair, user_id="someone-else"
            )
            say()

            await self.recover(client, url, hooks, keypair)

        store = hooks.store
        while True:  # callbacks have returned; wait for their rows to be marked done
            counts = await asyncio.to_thread(store.counts)
            if counts[State.PENDING] + counts[State.RUNNING] == 0:
                break
            if time.monotonic() > self.deadline:
                raise DemoFailedError("timed out waiting for the deliveries to finish")
            await asyncio.sleep(0.02)
        rows = [["REQUEST_ID", "STATE", "STATUS", "SOURCE", "ATTEMPTS", "RECEIVED (UTC)"]]
        for d in await asyncio.to_thread(store.list):
            rows.append(
                [
                    d.request_id,
                    d.state.value,
                    d.status,
                    d.source,
                    str(d.attempts),
                    format_time(d.received_at) or "-",
                ]
            )
        say("What the store holds now (`falhook deliveries list` shows the same):")
        say("   " + render_table(rows).replace("\n", "\n   "))
        say("   Rejected deliveries are never stored: only verified ones reach your callbacks.")

    async def recover(
        self, client: httpx.AsyncClient, url: str, hooks: WebhookReceiver, keypair: KeyPair
    ) -> None:
        """Step 8: a result whose webhook never comes is fetched from fal's queue."""
        say = self.say
        say("8. Never miss a result: submitted through falhook, but fal's webhook is lost")
        answer = await hooks.submit(DEMO_ENDPOINT, {"prompt": "a lighthouse at dusk"})
        request_id = answer["request_id"]
        say(f"   hooks.submit({DEMO_ENDPOINT!r}) → request {request_id}")
        say("   (fal completes it; the webhook never arrives: say your receiver was down)")
        await self.wait(self.recovered, "the result recovered from the queue")
        # The callback may start before the poller has written down what it did.
        while (expected := await asyncio.to_thread(_expectation, hooks, request_id)).state.active:
            if time.monotonic() > self.deadline:
                raise DemoFailedError("timed out waiting for the expectation to settle")
            await asyncio.sleep(0.02)
        say(
            f"   no delivery after {hooks.settings.recover_after_seconds:g} s → polled fal's "
            f"status {expected.polls} time(s), waited the grace, fetched the result"
        )
        say(f"   expectation {request_id}: {expected.state.value} ({expected.reason})")
        say("   fal's webhook turns up late after all:")
        late = fal_body(request_id, payload={"images": [{}], "prompt": "a lighthouse at dusk"})
        await self.post(client, url, late, request_id, keypair=keypair)
        say(f"   callback on_ok ran {self.calls.get(request_id, 0)} time(s) in all for it")
        say()


def _expectation(hooks: WebhookReceiver, request_id: str) -> Any:
    from falhook.receiver.store.expectations import Expectations

    return Expectations(hooks.store).get(request_id)


async def _main(out: TextIO, seconds: float) -> int:
    import uvicorn

    demo = _Demo(out, seconds)
    keypair = generate_keypair()
    with (
        tempfile.TemporaryDirectory(prefix="falhook-demo-") as tmp,
        JWKSServer(keypair) as jwks,
    ):
        sock, base = _loopback_socket()
        queue_sock, queue_url = _loopback_socket()
        fal_queue = DemoQueue(DEMO_FAL_KEY)
        fal_queue.base_url = queue_url
        settings = Settings(
            database_url=f"sqlite:///{Path(tmp) / 'falhook.db'}",
            jwks_url=jwks.url,
            # The demo's forged delivery should show its 401 at once: by default a key
            # that verifies nothing within 10 s of the last fetch gets 503 (it may be new).
            jwks_refresh_seconds=0.0,
            user_id=USER_ID,
            callback_backoff_seconds=0.2,
            callback_backoff_max_seconds=1.0,
            poll_seconds=0.5,
            shutdown_timeout_seconds=2.0,
            log_level="WARNING",
            # Recovery from the stand-in queue, in fractions of a second for the demo.
            fal_key=DEMO_FAL_KEY,
            queue_url=queue_url,
            public_url=base,
            recover_after_seconds=0.5,
            recover_poll_seconds=0.2,
            recover_grace_seconds=0.3,
        )
        if importlib.util.find_spec("obstore") is not None:  # the archive extra
            # Keep the media: files on the stand-in CDN, archived to a folder of the
            # temporary directory.
            demo.cdn = queue_url
            settings = settings.replace(
                archive_url=str(Path(tmp) / "media"),
                archive_hosts=(queue_url.removeprefix("http://"),),
            )
        hooks = WebhookReceiver(settings)
        hooks.on_ok(demo.on_ok)
        hooks.on_error(demo.on_error)
        url = base + WEBHOOK_PATH
        servers = [
            uvicorn.Server(
                uvicorn.Config(
                    app,
                    lifespan=lifespan,
                    access_log=False,
                    log_config=None,
                    log_level="warning",
                )
            )
            for app, lifespan in _apps(fal_queue.app, hooks.app)
        ]
        serving = [
            asyncio.create_task(server.serve(sockets=[s]))
            for server, s in zip(servers, (queue_sock, sock), strict=True)
        ]
        try:
            # uvicorn sets `started` once the lifespan has started
            while not all(server.started for server in servers):
                if any(task.done() for task in serving) or time.monotonic() > demo.deadline:
                    raise DemoFailedError("the receiver did not start")
                await asyncio.sleep(0.01)
            demo.say("falhook demo: a receiver, a store and a signing key, all local")
            demo.say(f"   receiver  {url}")
            demo.say(f"   store     {settings.database_url} (deleted afterwards)")
            demo.say(f"   keys      {jwks.url} (a fresh key standing in for fal's)")
            demo.say(f"   fal queue {queue_url} (a local stand-in for queue.fal.run)")
            if settings.archive_url is not None:
                demo.say(f"   archive   {settings.archive_url} (fal's media files kept here)")
            demo.say()
            await demo.story(url, hooks, keypair)
        except DemoFailedError as exc:
            demo.say(f"demo failed: {exc}")
            return 1
        finally:
            for server in reversed(servers):
                server.should_exit = True
            await asyncio.gather(*serving)
            sock.close()
            queue_sock.close()
    demo.say()
    demo.say("Next: `falhook keygen`, then `falhook serve` and `falhook send` (see the README).")
    return 0


def _apps(queue: Any, receiver: Any) -> list[tuple[Any, Literal["on", "off"]]]:
    # The stand-in queue has no lifespan; the receiver's starts its store and poller.
    return [(queue, "off"), (receiver, "on")]


def _loopback_socket() -> tuple[socket.socket, str]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


def run(*, timeout: float = 20.0, out: TextIO | None = None) -> int:
    """Run the demo; 0 when every step happened as expected."""
    with _quiet_logs():
        return asyncio.run(_main(out or sys.stdout, timeout))
