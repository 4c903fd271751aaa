"""The media archive's download path against a plain streaming download, side by side.

``python -m bench.archive [--size-mib 1024] [--rounds 3]``: an origin in a process of its
own serves one file of SIZE on loopback; each round downloads it once with a plain httpx
stream written to a file, and once through falhook's archive into a folder
(`Archiver.download`: the host rule, the pinned connection, counting, sha256, obstore's
staged write and rename), in alternating order. Prints each one's MiB/s per round, the
medians and their ratio (the goal: falhook at least 0.8x the plain download).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import sqlalchemy as sa

_PIECE = os.urandom(1024 * 1024)


def _serve(port: int, size: int) -> None:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            sent = 0
            while sent < size:
                chunk = _PIECE[: min(len(_PIECE), size - sent)]
                self.wfile.write(chunk)
                sent += len(chunk)

    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()


async def _plain(url: str, path: Path) -> None:
    async with (
        httpx.AsyncClient(timeout=60, trust_env=False) as client,
        client.stream("GET", url) as response,
    ):
        with path.open("wb") as out:
            async for chunk in response.aiter_bytes():
                out.write(chunk)


async def _falhook(url: str, folder: Path, host: str) -> None:
    from falhook.receiver.archive import Archiver, FoundUrl, MediaRows
    from falhook.receiver.settings import Settings

    settings = Settings(archive_url=str(folder), archive_hosts=(host,))
    archiver = Archiver(settings, MediaRows(sa.create_engine("sqlite://")))
    try:
        await archiver.download(FoundUrl("/video/url", url), "bench/video/file.mp4")
    finally:
        await archiver.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.archive", description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--size-kib", type=int, help="the file's size in KiB instead")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = args.size_kib * 1024 if args.size_kib else args.size_mib * 1024 * 1024
    if args.serve:
        _serve(args.serve, size)
        return 0
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    origin = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.archive",
            "--serve",
            str(port),
            "--size-mib",
            str(args.size_mib),
        ]
    )
    url, host = f"http://127.0.0.1:{port}/files/video.mp4", f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        speeds: dict[str, list[float]] = {"plain": [], "falhook": []}
        with tempfile.TemporaryDirectory(prefix="falhook-bench-archive-") as tmp:
            for round_ in range(args.rounds):
                order = ["plain", "falhook"] if round_ % 2 == 0 else ["falhook", "plain"]
                for name in order:
                    target = Path(tmp) / name
                    target.mkdir()
                    began = time.perf_counter()
                    if name == "plain":
                        asyncio.run(_plain(url, target / "file.mp4"))
                    else:
                        asyncio.run(_falhook(url, target, host))
                    seconds = time.perf_counter() - began
                    written = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
                    assert written == size, (name, written)
                    speeds[name].append(size / seconds / 2**20)
                    print(f"round {round_ + 1}: {name:8s} {speeds[name][-1]:8.1f} MiB/s")
                    shutil.rmtree(target)
    finally:
        origin.terminate()
        origin.wait()
    plain, falhook = (statistics.median(speeds[n]) for n in ("plain", "falhook"))
    ratio = falhook / plain
    print(
        f"median: plain {plain:.1f} MiB/s, falhook archive {falhook:.1f} MiB/s: "
        f"{ratio:.2f}x ({'PASS' if ratio >= 0.8 else 'FAIL'}: goal >= 0.8x)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
