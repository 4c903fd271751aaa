"""The console in a real browser: headless Chromium (Debian's package) driven by Playwright,
against a real `falhook serve` process.

An operator signs in, filters to the dead delivery, opens it, sees why it failed, replays
it and sees it done, then pauses and resumes dispatch. Screenshots are saved under
``$TEST_SCREENSHOTS_DIR`` (default: the test's tmp directory) as test artifacts.

Skipped, with the reason, only where no browser can be had: Playwright not installed, or
no Chromium at /usr/bin/chromium (``apt-get install chromium``). Playwright never
downloads a browser here; it drives the system's.
"""

from __future__ import annotations

import os
import shutil
import ssl
import struct
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.e2e.conftest import SpawnServer
from tests.e2e.server import Sender, wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Playwright

pytestmark = pytest.mark.slow

CHROMIUM = os.environ.get("TEST_CHROMIUM", "/usr/bin/chromium")
TOKEN = "browser-test-token-7f3a"


def _browser_missing() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install playwright; it is in the dev extras)"
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium; .ci/run installs it)"
    return None


def _png(width: int = 160, height: int = 120) -> bytes:
    """A small gradient PNG (a stand-in for a generated image), made with zlib alone."""
    rows = b"".join(
        b"\x00" + b"".join(bytes((x * 255 // width, y * 255 // height, 160)) for x in range(width))
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


class ImageHost:
    """A loopback image server (plain HTTP, or HTTPS with a self-signed certificate) that
    records the paths it was asked for."""

    def __init__(self, tls_dir: Path | None = None) -> None:
        image = _png()
        self.requested: list[str] = []
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                host.requested.append(self.path)
                self.send_response(200)
                self.send_header("content-type", "image/png")
                self.send_header("content-length", str(len(image)))
                self.end_headers()
                self.wfile.write(image)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        if tls_dir is not None:
            cert, key = _self_signed(tls_dir)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            self._server.socket = context.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for fal.media and *.fal.media (the browser is told to accept it)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fal.media")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("fal.media"), x509.DNSName("*.fal.media")]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def media_server() -> Iterator[ImageHost]:
    """Any other image host a payload may name (plain HTTP on loopback)."""
    host = ImageHost()
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture
def fal_media(tmp_path: Path) -> Iterator[ImageHost]:
    """A loopback stand-in for fal's media host: the browser resolves v3.fal.media and
    fal.media to it (Chromium's --host-resolver-rules) and accepts its self-signed
    certificate; nothing leaves the machine."""
    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    host = ImageHost(tls_dir)
    try:
        yield host
    finally:
        host.stop()


def _launch(p: Playwright, fal_media: ImageHost | None = None) -> Browser:
    args = ["--no-sandbox"]
    if fal_media is not None:
        where = f"127.0.0.1:{fal_media.port}"
        args.append(f"--host-resolver-rules=MAP v3.fal.media {where}, MAP fal.media {where}")
    return p.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)


@pytest.fixture
def screenshots(tmp_path: Path) -> Path:
    path = Path(os.environ.get("TEST_SCREENSHOTS_DIR") or tmp_path / "screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_operator_replays_a_dead_delivery_and_pauses_dispatch(
    spawn: SpawnServer,
    sender: Sender,
    fal_media: ImageHost,
    screenshots: Path,
    tmp_path: Path,
) -> None:
    missing = _browser_missing()
    if missing:
        pytest.skip(missing)
    from playwright.sync_api import expect, sync_playwright

    server = spawn(
        env={
            "FALHOOK_CONSOLE_TOKEN": TOKEN,
            "FALHOOK_CALLBACK_MAX_ATTEMPTS": "1",
            "FALHOOK_POLL_SECONDS": "0.5",
        }
    )
    downstream_up = tmp_path / "downstream-up"  # the callback fails until this exists
    with httpx.Client(timeout=30) as client:
        for i in range(4):
            image = {"url": f"https://v3.fal.media/files/out-{i}.png", "content_type": "image/png"}
            fields: dict[str, Any] = {"payload": {"images": [image], "seed": i}}
            if i == 1:  # fal's own failure: delivered with status ERROR, handled all the same
                fields = {"status": "ERROR", "error": "Internal server error", "payload": None}
            response = sender.post(client, server.webhook_url, f"req-{i}-a91f", **fields)
            assert response.status_code == 200
        long_id = "req-long-" + "x" * 246  # the longest id accepted: 255 characters
        assert sender.post(client, server.webhook_url, long_id).status_code == 200
        dead_id = "req-dead-7c1e"
        image = {"url": "https://v3.fal.media/files/cat.png", "content_type": "image/png"}
        payload = {
            "test": "fail_unless_file",
            "path": str(downstream_up),
            "images": [image],
            "prompt": "a cat <script>alert(1)</script>",
        }
        assert sender.post(client, server.webhook_url, dead_id, payload=payload).status_code == 200
    wait_for(
        lambda: (server.row(dead_id) or {}).get("state") == "dead",
        timeout=15,
        what="the failing delivery to be dead",
    )
    wait_for(lambda: len(server.done_ids()) == 5, timeout=15, what="the others to be done")

    base = server.url + "/console/"
    with sync_playwright() as p:
        browser = _launch(p, fal_media)
        try:
            context = browser.new_context(ignore_https_errors=True)
            page = context.new_page()
            page.set_viewport_size({"width": 1280, "height": 480})
            page.set_default_timeout(10_000)
            dialogs: list[str] = []

            def on_dialog(dialog: Any) -> None:  # an alert() from a payload would land here
                dialogs.append(dialog.message)
                dialog.dismiss()

            page.on("dialog", on_dialog)

            # Sign in.
            page.goto(base)
            expect(page).to_have_url(base + "signin")
            page.fill("#token", "wrong")
            page.click("#signin")
            expect(page.locator(".error")).to_have_text("Wrong token.")
            page.fill("#token", TOKEN)
            page.click("#signin")
            expect(page).to_have_url(base)
            expect(page.locator("#dispatch-state")).to_contain_text("running")
            expect(page.locator("table.deliveries td.rid a")).to_have_count(6)
            page.screenshot(path=str(screenshots / "console.png"))

            # The dead delivery alert: filter to dead, open it, see why.
            page.select_option("#f-state", "dead")
            page.click("#apply")
            rows = page.locator("table.deliveries td.rid a")
            expect(rows).to_have_count(1)
            expect(rows.first).to_have_text(dead_id)
            page.screenshot(path=str(screenshots / "console-dead.png"), full_page=True)
            rows.first.click()
            expect(page.locator("#state")).to_have_text("dead")
            expect(page.locator("#last-error")).to_contain_text("does not exist")
            expect(page.locator("#body")).to_contain_text("<script>alert(1)</script>")
            thumbnail = page.locator(".media img").first
            expect(thumbnail).to_be_visible()
            assert thumbnail.evaluate("img => img.complete && img.naturalWidth") == 160
            page.screenshot(path=str(screenshots / "console-delivery.png"), full_page=True)

            # The downstream is fixed: replay, confirm, see it done.
            downstream_up.touch()
            page.click("#replay")
            expect(page.locator("h1")).to_have_text("Replay this delivery?")
            page.click("#confirm")
            expect(page.locator("#outcome")).to_contain_text(f"Replayed {dead_id} (was dead).")
            page.click("text=Open the delivery")

            def done() -> bool:
                page.reload()
                return page.locator("#state").inner_text() == "done"

            wait_for(done, timeout=15, interval=0.3, what="the replayed delivery to be done")

            # Pause, with a reason; every page says so; resume.
            page.goto(base)
            page.fill("input[name=reason]", "warehouse DB failover")
            page.click("#pause")
            expect(page.locator("h1")).to_have_text("Pause dispatch?")
            page.click("#confirm")
            expect(page.locator("#outcome")).to_contain_text("Dispatch is paused")
            expect(page.locator("#dispatch-state")).to_contain_text("paused")
            expect(page.locator("#dispatch-state")).to_contain_text("warehouse DB failover")
            assert httpx.get(server.url + "/readyz").json()["status"] == "ready"
            wait_for(
                lambda: "falhook_dispatch_paused 1.0" in httpx.get(server.url + "/metrics").text,
                timeout=5,
                what="the paused gauge",
            )
            page.goto(base)
            page.screenshot(path=str(screenshots / "console-paused.png"), full_page=True)
            page.click("#resume")
            expect(page.locator("h1")).to_have_text("Resume dispatch?")
            page.click("#confirm")
            expect(page.locator("#outcome")).to_contain_text("Dispatch resumed")
            expect(page.locator("#dispatch-state")).to_contain_text("running")
            assert dialogs == []  # nothing in a payload ran as script

            # At a phone's width the page fits (a long id wraps; the table scrolls inside
            # its own box), and the header's buttons stay on screen.
            page.set_viewport_size({"width": 360, "height": 740})
            page.goto(base)
            assert page.evaluate("document.documentElement.scrollWidth") <= 360
            box = page.locator("header.top button").last.bounding_box()
            assert box is not None and box["x"] + box["width"] <= 360, box
            page.screenshot(path=str(screenshots / "console-phone.png"), full_page=True)
            # At 390 px each row of the list stays on one line, the 255-character id too.
            page.set_viewport_size({"width": 390, "height": 844})
            page.goto(base)
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            heights = page.locator("table.deliveries tbody tr").evaluate_all(
                "rows => rows.map(r => r.getBoundingClientRect().height)"
            )
            line = page.locator("table.deliveries tbody td.time").first.evaluate(
                "td => parseFloat(getComputedStyle(td).lineHeight)"
            )
            assert len(heights) == 6 and max(heights) < 2.5 * line, (heights, line)
            page.goto(base + "deliveries/" + dead_id)
            assert page.evaluate("document.documentElement.scrollWidth") <= 390
            page.screenshot(path=str(screenshots / "console-phone-delivery.png"), full_page=True)
        finally:
            browser.close()
    assert dead_id in server.done_ids()


def test_only_fal_media_images_are_fetched_by_the_browser(
    spawn: SpawnServer, sender: Sender, media_server: ImageHost, fal_media: ImageHost
) -> None:
    """A payload names any URL it likes: opening the delivery makes the operator's browser
    fetch only https images on fal's media hosts; every other URL is a plain link."""
    missing = _browser_missing()
    if missing:
        pytest.skip(missing)
    from playwright.sync_api import expect, sync_playwright

    server = spawn(env={"FALHOOK_CONSOLE_TOKEN": TOKEN})
    urls = [
        "https://v3.fal.media/files/ok.png",  # the one thumbnail
        f"{media_server.url}/files/plain-http.png",
        "https://someone:secret@v3.fal.media/files/userinfo.png",
        f"https://127.0.0.1:{fal_media.port}/files/not-fal.png",
        "https://v3.fal.media:8443/files/other-port.png",
    ]
    payload = {"images": [{"url": url, "content_type": "image/png"} for url in urls]}
    with httpx.Client(timeout=30) as client:
        response = sender.post(client, server.webhook_url, "req-urls", payload=payload)
        assert response.status_code == 200
        csp = client.get(server.url + "/console/signin").headers["content-security-policy"]

    base = server.url + "/console/"
    with sync_playwright() as p:
        browser = _launch(p, fal_media)
        try:
            page = browser.new_context(ignore_https_errors=True).new_page()
            page.set_default_timeout(10_000)
            page.goto(base + "signin")
            page.fill("#token", TOKEN)
            page.click("#signin")
            expect(page).to_have_url(base)
            page.goto(base + "deliveries/req-urls")
            thumbnails = page.locator(".media img")
            expect(thumbnails).to_have_count(1)
            assert thumbnails.first.get_attribute("src") == urls[0]
            wait_for(
                lambda: bool(
                    thumbnails.first.evaluate("img => img.complete && img.naturalWidth") == 160
                ),
                timeout=10,
                what="the thumbnail to load",
            )
            expect(page.locator(".media li a[href]")).to_have_count(len(urls) + 1)
        finally:
            browser.close()
    assert media_server.requested == []
    assert fal_media.requested == ["/files/ok.png"]
    # And the browser would refuse any other image source anyway.
    assert "img-src 'self' https://fal.media https://*.fal.media;" in csp, csp
