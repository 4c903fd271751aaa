"""Hostile clients against a real `falhook serve`: what headers alone decide is answered
before the body, buffered bytes are bounded, slow or idle connections are closed, and the
memory large bodies took is given back."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from falhook.verify.testing import JWKSServer, fal_body
from tests.e2e.conftest import SpawnServer
from tests.e2e.server import Sender, ServerProcess, wait_for

pytestmark = pytest.mark.slow

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, jwks_server: JWKSServer
) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tmp_path_factory.mktemp("hostile"),
        jwks=jwks_server.url,
        env={
            "FALHOOK_MAX_BODY_BYTES": str(MiB),
            "FALHOOK_MAX_BUFFERED_BYTES": str(MiB),
            "FALHOOK_BODY_TIMEOUT_SECONDS": "1",
            "FALHOOK_HEADER_TIMEOUT_SECONDS": "1",
            "FALHOOK_MAX_CONNECTIONS": "8",
        },
    )
    try:
        yield proc.start()
    finally:
        proc.kill()


def _connect(server: ServerProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=5)


def _request_head(headers: dict[str, str], length: int, *extra: str) -> bytes:
    lines = ["POST /webhooks/fal HTTP/1.1", "Host: x", f"Content-Length: {length}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines += list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one response (head + Content-Length body); the socket timeout is the deadline."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a response: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return int(status_line.split()[1]), headers, rest


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes the connection (EOF or reset) within `seconds`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if sock.recv(65536) == b"":
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def _answered_json_and_closed(sock: socket.socket, status: int, error: str) -> None:
    """The protocol's own answers: a JSON error with its reason, then the connection
    closed."""
    got, headers, text = _read_response(sock)
    assert got == status, text
    assert headers["content-type"] == "application/json"
    assert json.loads(text)["error"] == error
    assert _closed_within(sock, 3)


def _acknowledged_and_closed(sock: socket.socket, request_id: str) -> None:
    """A delivery's 200, then the connection closed."""
    status, _, text = _read_response(sock)
    assert status == 200 and json.loads(text)["request_id"] == request_id, text
    assert _closed_within(sock, 3)


def _chunked_head(signed: dict[str, str]) -> bytes:
    head = ["POST /webhooks/fal HTTP/1.1", "Host: x", "Transfer-Encoding: chunked"]
    head += [f"{name}: {value}" for name, value in signed.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


def _stale(sender: Sender) -> dict[str, str]:
    _, headers = sender.signed("stale")
    headers["X-Fal-Webhook-Timestamp"] = str(int(time.time()) - 3600)
    return headers


@pytest.mark.parametrize(
    ("make_headers", "error"),
    [
        (lambda sender: {}, "missing_header"),
        (
            lambda sender: {**sender.signed("garbage")[1], "X-Fal-Webhook-Signature": "zz"},
            "malformed_header",
        ),
        (_stale, "timestamp_too_old"),
        (
            lambda sender: {**sender.signed("other")[1], "X-Fal-Webhook-User-Id": "someone-else"},
            "user_mismatch",
        ),
    ],
)
def test_headers_alone_are_rejected_before_any_body_byte(
    server: ServerProcess, sender: Sender, make_headers: object, error: str
) -> None:
    headers = make_headers(sender)  # type: ignore[operator]
    with _connect(server) as sock:
        # A body is declared but never sent: the answer must not wait for it.
        sock.sendall(_request_head(headers, 900_000, "Expect: 100-continue"))
        status, response_headers, body = _read_response(sock)
        assert status == 401, body
        assert response_headers.get("connection") == "close"
        assert error.encode() in body
        assert _closed_within(sock, 3)


def _send_refused(sock: socket.socket, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send what may be answered (and closed) before all of it is read, then the answer."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)
    return _read_response(sock)


def test_bytes_buffered_across_requests_are_bounded(server: ServerProcess, sender: Sender) -> None:
    big = fal_body("budget-1", payload={"pad": "x" * 700_000})
    body, headers = sender.signed("budget-1", body=big)
    other, other_headers = sender.signed("budget-2", body=big.replace(b"budget-1", b"budget-2"))
    with _connect(server) as first:
        first.sendall(_request_head(headers, len(body)) + body[:-1])
        # Once the first request's bytes are held, a second of the same size goes over the
        # budget while its body comes in: 503 (fal retries), and the connection closed.
        deadline = time.monotonic() + 5
        while True:
            with _connect(server) as second:
                status, response_headers, text = _send_refused(
                    second, _request_head(other_headers, len(other)) + other
                )
            if status == 503 or time.monotonic() > deadline:
                break
        assert status == 503, text
        assert b"body_budget_exceeded" in text
        assert response_headers.get("connection") == "close"
        # The first, within the budget, completes normally.
        first.sendall(body[-1:])
        status, _, text = _read_response(first)
        assert status == 200, text
    # Once it is done, its bytes are given back: the same size is accepted again.
    with _connect(server) as third:
        third.sendall(_request_head(other_headers, len(other)) + other)
        status, _, text = _read_response(third)
        assert status == 200, text


def test_declared_lengths_alone_hold_none_of_the_budget(
    server: ServerProcess, sender: Sender
) -> None:
    # Headers that pass the checks (a forged signature is only found out once the body is
    # in) declaring the largest body and sending nothing: the budget is bytes received.
    _, forged = sender.signed("forged")
    forged["X-Fal-Webhook-Signature"] = "ab" * 64
    idle = [_connect(server) for _ in range(4)]
    try:
        for sock in idle:
            sock.sendall(_request_head(forged, MiB))
        body, headers = sender.signed("while-idle-heads")
        with _connect(server) as sock:
            sock.sendall(_request_head(headers, len(body)) + body)
            status, _, text = _read_response(sock)
            assert status == 200, text
    finally:
        for sock in idle:
            sock.close()


def test_a_body_that_does_not_arrive_in_time_is_answered_408(
    server: ServerProcess, sender: Sender
) -> None:
    body, headers = sender.signed("slow-body")
    with _connect(server) as sock:
        started = time.monotonic()
        sock.sendall(_request_head(headers, len(body)) + body[:10])
        status, response_headers, text = _read_response(sock)
        assert status == 408, text
        assert b"body_timeout" in text
        assert response_headers.get("connection") == "close"
        assert time.monotonic() - started < 4


def test_idle_and_slow_header_connections_are_closed(server: ServerProcess) -> None:
    with _connect(server) as idle, _connect(server) as slow:
        slow.sendall(b"POST /webhooks/fal HTTP/1.1\r\nHost: x\r\n")
        assert _closed_within(idle, 4)
        assert _closed_within(slow, 4)


def test_connections_beyond_the_cap_get_503(server: ServerProcess, sender: Sender) -> None:
    held = [_connect(server) for _ in range(8)]
    try:
        for sock in held:  # headers sent, so each holds its connection
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(sock)[0] == 200
        with _connect(server) as extra:
            extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            # Closed: its slot is given back at once.
            _answered_json_and_closed(extra, 503, "too_many_connections")
    finally:
        for sock in held:
            sock.close()


def test_an_oversized_request_head_gets_431(server: ServerProcess) -> None:
    with _connect(server) as sock:
        head = b"POST /webhooks/fal HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 70_000
        sock.sendall(head + b"\r\n\r\n")
        status, _, text = _read_response(sock)
        assert status == 431, text
        assert b"headers_too_large" in text
        assert _closed_within(sock, 3)


@pytest.mark.parametrize(
    "head",
    [
        b"POST /webhooks/fal HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /webhooks/fal HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /webhooks/fal HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
        b"Content-Length: 3\r\n\r\n{}",
        b"this is not http\r\n\r\n",
    ],
    ids=["length-not-a-number", "negative-length", "two-lengths", "junk"],
)
def test_a_request_that_cannot_be_parsed_gets_a_json_400(
    server: ServerProcess, head: bytes
) -> None:
    with _connect(server) as sock:
        sock.sendall(head)
        _answered_json_and_closed(sock, 400, "malformed_request")
    # uvicorn's warning about it is a JSON line like every other line on stderr.
    server.wait_for_log("Invalid HTTP request received.")
    # (The harness marks each start of the server in its log with a "=== start" line.)
    for line in server.log_path.read_text().splitlines():
        if not line or line.startswith("=== start "):
            continue
        record = json.loads(line)
        assert "color_message" not in record
        if record["msg"] == "Invalid HTTP request received.":
            assert record["level"] == "warning" and record["logger"] == "uvicorn.error"


@pytest.mark.parametrize(
    "upgrade",
    [
        # A WebSocket handshake: uvicorn would hand the connection to a WebSocket handler
        # with no deadline, and Starlette answered it with a 500.
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        # Any other upgrade: the request ran without its body.
        None,
    ],
    ids=["websocket", "h2c-on-a-signed-delivery"],
)
def test_a_protocol_upgrade_gets_a_json_400_not_a_body_less_request(
    server: ServerProcess, sender: Sender, upgrade: str | None
) -> None:
    if upgrade is None:
        body, signed = sender.signed("upgrade-h2c")
        raw = _request_head(signed, len(body), "Connection: Upgrade", "Upgrade: h2c") + body
    else:
        raw = upgrade.encode()
    with _connect(server) as sock:
        sock.sendall(raw)
        _answered_json_and_closed(sock, 400, "upgrade_not_supported")


def test_junk_after_a_delivery_does_not_take_its_answer(
    server: ServerProcess, sender: Sender
) -> None:
    # The delivery before the junk is stored and acknowledged: it gets its 200, then the
    # connection is closed (the junk gets nothing).
    body, signed = sender.signed("before-junk")
    with _connect(server) as sock:
        sock.sendall(_request_head(signed, len(body)) + body + b"GARBAGE\r\n\r\n")
        _acknowledged_and_closed(sock, "before-junk")


def test_a_chunked_body_that_cannot_be_parsed_gets_a_json_400_at_once(
    server: ServerProcess, sender: Sender
) -> None:
    body, signed = sender.signed("bad-chunk")
    with _connect(server) as sock:
        sock.sendall(_chunked_head(signed) + b"zz\r\n" + body)
        _answered_json_and_closed(sock, 400, "malformed_request")


def test_a_client_that_half_closes_after_its_request_gets_its_answer(
    server: ServerProcess, sender: Sender
) -> None:
    body, signed = sender.signed("half-closed")
    with _connect(server) as sock:
        sock.sendall(_request_head(signed, len(body)) + body)
        sock.shutdown(socket.SHUT_WR)  # done sending; still reading
        _acknowledged_and_closed(sock, "half-closed")


def _chunked(body: bytes, trailer: str) -> bytes:
    return f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n" + trailer.encode() + b"\r\n\r\n"


def test_a_chunked_bodys_trailer_is_not_a_header(server: ServerProcess, sender: Sender) -> None:
    # The same bytes get the same answer however they arrive: a signature header in the
    # trailer neither duplicates the head's nor stands in for a missing one.
    body, signed = sender.signed("trailer-dup")
    with _connect(server) as sock:
        sock.sendall(_chunked_head(signed) + _chunked(body, "X-Fal-Webhook-Signature: 00"))
        status, _, text = _read_response(sock)
        assert status == 200, text
    body, signed = sender.signed("trailer-only")
    signature = signed.pop("X-Fal-Webhook-Signature")
    with _connect(server) as sock:
        trailer = f"X-Fal-Webhook-Signature: {signature}"
        sock.sendall(_chunked_head(signed) + _chunked(body, trailer))
        status, _, text = _read_response(sock)
        assert status == 401 and json.loads(text)["error"] == "missing_header", text


def _memory(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (the peak) of a process, in MiB."""
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status if line.startswith("Vm"))
    return {name: int(fields[name].split()[0]) / 1024 for name in ("VmRSS", "VmHWM")}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; glibc")
def test_memory_is_given_back_after_a_burst_of_large_bodies(
    spawn: SpawnServer, sender: Sender, client: httpx.Client
) -> None:
    server = spawn()  # the defaults: 16 MiB bodies, 64 MiB buffered at once
    for i in range(20):  # warm: what every delivery allocates once is there before
        assert sender.post(client, server.webhook_url, f"small-{i}").status_code == 200
    before = _memory(server.pid)["VmRSS"]

    def deliver(request_id: str) -> int:
        body = fal_body(request_id, payload={"pad": "x" * (8 * MiB)})
        body, headers = sender.signed(request_id, body=body)
        with _connect(server) as sock:
            sock.settimeout(60)
            try:
                sock.sendall(_request_head(headers, len(body)) + body)
                return _read_response(sock)[0]
            except ConnectionResetError:
                return 0  # refused (503, over the budget) and closed while we still sent

    statuses: list[int] = []
    with ThreadPoolExecutor(8) as pool:
        for burst in range(3):  # 8 at once: as many as the 64 MiB budget holds
            statuses += pool.map(deliver, [f"large-{burst}-{i}" for i in range(8)])
    assert statuses.count(200) >= 16, statuses  # the rest: over the budget, 503
    peak = _memory(server.pid)["VmHWM"]
    grew = peak - before
    assert grew > 150, f"the burst took RSS from {before:.0f} to only {peak:.0f} MiB"

    # What the burst took is given back within seconds: RSS ~78 -> ~330 -> 81-104 MiB here.
    # Before, most of it stayed for good: 78 -> ~350 -> 256-321 MiB.
    def given_back() -> float | None:
        rss = _memory(server.pid)["VmRSS"]
        return rss if rss <= before + 64 else None

    try:
        wait_for(given_back, timeout=30, interval=0.2, what="RSS to come back down")
    except AssertionError:
        rss = _memory(server.pid)["VmRSS"]
        raise AssertionError(
            f"RSS {before:.0f} MiB before, {peak:.0f} at the peak, still {rss:.0f}"
        ) from None
