"""The media archive in a real `falhook serve`: files kept before the callbacks run, no
second fetch for a duplicate, a SIGKILL mid-download ending with the whole file after a
restart, and a large file streamed without growing the process's peak memory."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import SpawnServer
from tests.e2e.server import Sender, ServerProcess, wait_for
from tests.fakes.media_origin import MediaOrigin, content, sha256_of
from tests.fakes.s3 import s3_bucket, s3_server

__all__ = ["s3_bucket", "s3_server"]  # fixtures

pytestmark = pytest.mark.slow


@pytest.fixture
def origin() -> Iterator[MediaOrigin]:
    with MediaOrigin() as server:
        yield server


def _archive_env(origin: MediaOrigin, folder: Path, **extra: str) -> dict[str, str]:
    return {
        "FALHOOK_ARCHIVE_URL": str(folder),
        "FALHOOK_ARCHIVE_HOSTS": origin.host,
        **extra,
    }


def _media(server: ServerProcess, request_id: str) -> list[dict[str, Any]]:
    records = server.wait_records(
        lambda rs: any(r["request_id"] == request_id and r["phase"] == "done" for r in rs),
        timeout=60,
    )
    done = [r for r in records if r["request_id"] == request_id and r["phase"] == "done"]
    media: list[dict[str, Any]] = done[-1]["media"]
    return media


def test_files_are_archived_before_the_callback_and_a_duplicate_fetches_nothing(
    spawn: SpawnServer, sender: Sender, client: httpx.Client, origin: MediaOrigin, tmp_path: Path
) -> None:
    folder = tmp_path / "media"
    server = spawn(env=_archive_env(origin, folder))
    payload = {
        "images": [{"url": f"{origin.url}/files/one.png?size=70000", "file_name": "one.png"}],
        "video": {"url": f"{origin.url}/files/two.mp4?size=2500000"},
    }
    response = sender.post(client, server.webhook_url, "arch-1", payload=payload)
    assert response.status_code == 200
    media = _media(server, "arch-1")
    assert [(m["pointer"], m["state"]) for m in media] == [
        ("/images/0/url", "archived"),
        ("/video/url", "archived"),
    ]
    stored = Path(media[1]["stored_url"].removeprefix("file://"))
    assert stored.read_bytes() == content("two.mp4", 2500000)

    again = sender.post(client, server.webhook_url, "arch-1", payload=payload)
    assert again.json()["duplicate"] is True
    assert origin.count("/files/one.png") == 1 and origin.count("/files/two.mp4") == 1

    # A replay runs the callback again, with the files where they were: nothing fetched.
    replay = subprocess.run(
        [sys.executable, "-m", "falhook.receiver", "deliveries", "replay", "arch-1"],
        env=server.env,
        cwd=server.workdir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert replay.returncode == 0, replay.stderr
    server.wait_records(
        lambda rs: sum(r["request_id"] == "arch-1" and r["phase"] == "done" for r in rs) == 2,
        timeout=60,
    )
    assert _media(server, "arch-1") == media
    assert origin.count("/files/one.png") == 1 and origin.count("/files/two.mp4") == 1


def test_sigkill_mid_download_ends_with_the_whole_file_after_a_restart(
    spawn: SpawnServer, sender: Sender, client: httpx.Client, origin: MediaOrigin, tmp_path: Path
) -> None:
    folder = tmp_path / "media"
    env = _archive_env(origin, folder, FALHOOK_LEASE_SECONDS="1")
    server = spawn(env=env)
    size = 200 * 1024
    url = f"{origin.url}/trickle/slow.webm?size={size}&every=0.005"
    response = sender.post(client, server.webhook_url, "arch-kill", payload={"video": url})
    assert response.status_code == 200  # acknowledged at once: never waits on a download
    wait_for(lambda: origin.count("/trickle/slow.webm") >= 1, timeout=20, what="download")
    time.sleep(0.3)  # some of the file is on its way
    server.kill()
    final = folder / "arch-kill" / "video" / "slow.webm"
    assert not final.exists()  # no partial object at its final key

    server.restart()
    media = _media(server, "arch-kill")
    assert media[0]["state"] == "archived"
    assert final.stat().st_size == size
    assert origin.count("/trickle/slow.webm") == 2


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_a_large_file_is_streamed_without_growing_peak_memory(
    spawn: SpawnServer, sender: Sender, client: httpx.Client, origin: MediaOrigin, tmp_path: Path
) -> None:
    folder = tmp_path / "media"
    server = spawn(env=_archive_env(origin, folder))
    # Warm up: the first delivery and download import and allocate what every one needs.
    sender.post(client, server.webhook_url, "warm", payload={"f": f"{origin.url}/files/w.bin"})
    _media(server, "warm")
    before = _peak_rss_kib(server.pid)
    size = 400 * 1024 * 1024
    payload = {"video": {"url": f"{origin.url}/files/large.mp4?size={size}"}}
    assert sender.post(client, server.webhook_url, "arch-large", payload=payload).status_code == 200
    media = _media(server, "arch-large")
    grown_mib = (_peak_rss_kib(server.pid) - before) / 1024
    assert media[0]["state"] == "archived"
    stored = Path(media[0]["stored_url"].removeprefix("file://"))
    assert stored.stat().st_size == size
    assert grown_mib < 100, f"peak RSS grew by {grown_mib:.0f} MiB"
    assert media[0]["sha256"] == sha256_of("large.mp4", size)  # the whole file's hash
    metrics = httpx.get(server.url + "/metrics").text
    archived = next(
        line.split()[1]
        for line in metrics.splitlines()
        if line.startswith("falhook_media_archived_bytes_total ")
    )
    assert float(archived) == size + 1000  # this file and the warm-up's


def test_files_are_archived_to_s3_by_a_real_serve(
    spawn: SpawnServer,
    sender: Sender,
    client: httpx.Client,
    origin: MediaOrigin,
    s3_bucket: str,
    s3_server: str,
) -> None:
    import boto3

    # The AWS_* variables (set by the fixture) reach the server's environment.
    server = spawn(
        env={"FALHOOK_ARCHIVE_URL": f"s3://{s3_bucket}/fal", "FALHOOK_ARCHIVE_HOSTS": origin.host}
    )
    payload = {"audio": {"url": f"{origin.url}/files/voice.mp3?size=6000000"}}
    assert sender.post(client, server.webhook_url, "arch-s3", payload=payload).status_code == 200
    media = _media(server, "arch-s3")
    assert media[0]["state"] == "archived"
    assert media[0]["stored_url"] == f"s3://{s3_bucket}/fal/arch-s3/audio-url/voice.mp3"
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    head = s3.head_object(Bucket=s3_bucket, Key="fal/arch-s3/audio-url/voice.mp3")
    assert (head["ContentLength"], head["ContentType"]) == (6000000, "audio/mpeg")


def test_files_are_archived_before_a_forward(
    spawn: SpawnServer, sender: Sender, client: httpx.Client, origin: MediaOrigin, tmp_path: Path
) -> None:
    import http.server
    import threading

    folder = tmp_path / "media"
    kept = folder / "arch-fwd" / "image-url" / "f.png"
    seen: list[bool] = []  # whether the file was whole in the archive when the forward came

    class App(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            seen.append(kept.exists() and kept.stat().st_size == 30000)
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    app = http.server.ThreadingHTTPServer(("127.0.0.1", 0), App)
    threading.Thread(target=app.serve_forever, daemon=True).start()
    try:
        forward = f"http://127.0.0.1:{app.server_address[1]}/hook"
        server = spawn(env=_archive_env(origin, folder), args=["--forward-to", forward])
        payload = {"image": {"url": f"{origin.url}/files/f.png?size=30000"}}
        assert (
            sender.post(client, server.webhook_url, "arch-fwd", payload=payload).status_code == 200
        )
        wait_for(lambda: seen, timeout=30, what="the forward")
        assert seen == [True]
    finally:
        app.shutdown()
        app.server_close()
