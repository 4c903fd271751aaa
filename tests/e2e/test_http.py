"""Every HTTP answer of DESIGN.md, from a real `falhook serve` on loopback."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from falhook.verify.testing import JWKSServer, generate_keypair, sign
from tests.e2e.server import USER_ID, Sender, ServerProcess

pytestmark = pytest.mark.slow

MAX_BODY = 1024


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, jwks_server: JWKSServer
) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        tmp_path_factory.mktemp("http"),
        jwks=jwks_server.url,
        # Every miss refreshes the keys, so a forged signature is a 401 at once (by default
        # it is 503 until a refresh is allowed: it might be a key published since).
        env={"FALHOOK_MAX_BODY_BYTES": str(MAX_BODY), "FALHOOK_JWKS_REFRESH_SECONDS": "0"},
    )
    try:
        yield proc.start()
    finally:
        proc.kill()


def _error(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"] == error, response.text


def test_new_then_duplicate(server: ServerProcess, sender: Sender, client: httpx.Client) -> None:
    first = sender.post(client, server.webhook_url, "http-new")
    assert first.status_code == 200
    assert first.json() == {"request_id": "http-new", "duplicate": False}
    again = sender.post(client, server.webhook_url, "http-new")
    assert again.status_code == 200
    assert again.json() == {"request_id": "http-new", "duplicate": True}


def test_trailing_slash_is_served_never_redirected(
    server: ServerProcess, sender: Sender, client: httpx.Client
) -> None:
    response = sender.post(client, server.webhook_url + "/", "http-slash")
    assert response.status_code == 200, response.text
    assert response.json() == {"request_id": "http-slash", "duplicate": False}
    assert not response.is_redirect


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"not json at all", "invalid_json"),
        (b"\xff\xfe\x00", "invalid_json"),
        (b"[1, 2, 3]", "invalid_json"),
        (b'"a string"', "invalid_json"),
        (b'{"status": "OK", "payload": {}}', "missing_request_id"),
        (b'{"request_id": 17, "status": "OK"}', "missing_request_id"),
        (b'{"request_id": "someone-else", "status": "OK"}', "request_id_mismatch"),
        (b'{"request_id": "http-400", "status": "MAYBE"}', "invalid_status"),
        (b'{"request_id": "http-400"}', "invalid_status"),
    ],
)
def test_verified_but_malformed_is_400(
    server: ServerProcess, sender: Sender, client: httpx.Client, body: bytes, error: str
) -> None:
    body_, headers = sender.signed("http-400", body=body)
    _error(client.post(server.webhook_url, content=body_, headers=headers), 400, error)


def test_401_bad_signature(server: ServerProcess, client: httpx.Client) -> None:
    forger = Sender(generate_keypair(b"\x09" * 32))
    _error(forger.post(client, server.webhook_url, "http-forged"), 401, "invalid_signature")


def test_401_body_changed_after_signing(
    server: ServerProcess, sender: Sender, client: httpx.Client
) -> None:
    body, headers = sender.signed("http-tampered")
    tampered = body.replace(b'"OK"', b'"ERROR"')
    _error(
        client.post(server.webhook_url, content=tampered, headers=headers),
        401,
        "invalid_signature",
    )


@pytest.mark.parametrize(
    "header",
    [
        "X-Fal-Webhook-Signature",
        "X-Fal-Webhook-Request-Id",
        "X-Fal-Webhook-User-Id",
        "X-Fal-Webhook-Timestamp",
    ],
)
def test_401_missing_header(
    server: ServerProcess, sender: Sender, client: httpx.Client, header: str
) -> None:
    body, headers = sender.signed("http-missing")
    del headers[header]
    _error(client.post(server.webhook_url, content=body, headers=headers), 401, "missing_header")


def test_401_stale_timestamp(server: ServerProcess, sender: Sender, client: httpx.Client) -> None:
    body, _ = sender.signed("http-stale")
    headers = sign(body, "http-stale", USER_ID, int(time.time()) - 3600, keypair=sender.keypair)
    _error(client.post(server.webhook_url, content=body, headers=headers), 401, "timestamp_too_old")


def test_401_user_mismatch(server: ServerProcess, sender: Sender, client: httpx.Client) -> None:
    other_user = Sender(sender.keypair, user_id="somebody-else")
    _error(other_user.post(client, server.webhook_url, "http-user"), 401, "user_mismatch")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("suffix", ["", "/"])
def test_405_wrong_method(
    server: ServerProcess, client: httpx.Client, method: str, suffix: str
) -> None:
    response = client.request(method, server.webhook_url + suffix, content=b"{}")
    _error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"


def test_404_is_json(server: ServerProcess, client: httpx.Client) -> None:
    _error(client.post(server.url + "/webhooks/other", content=b"{}"), 404, "not_found")
    _error(client.get(server.url + "/healthz/"), 404, "not_found")


def test_413_declared_content_length_answered_before_the_body(server: ServerProcess) -> None:
    """Content-Length over the cap: 413 at once, though not one body byte was sent."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(
            b"POST /webhooks/fal HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), answer
    assert b"body_too_large" in body


def test_413_chunked_body_answered_without_reading_the_rest(
    server: ServerProcess, sender: Sender, client: httpx.Client
) -> None:
    """No Content-Length: the server stops reading at the cap and answers 413."""
    _, headers = sender.signed("http-chunked")
    total = 256 * 1024 * 1024
    chunk = b"x" * 65536
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        while sent < total:
            sent += len(chunk)
            yield chunk

    response = client.post(server.webhook_url, content=body(), headers=headers)
    assert "content-length" not in response.request.headers
    _error(response, 413, "body_too_large")
    # The client was cut off long before the end: the server did not drain 256 MiB.
    assert sent < total // 4, sent


def test_413_small_chunked_body_just_over_the_cap(
    server: ServerProcess, sender: Sender, client: httpx.Client
) -> None:
    _, headers = sender.signed("http-chunked-small")

    def body() -> Iterator[bytes]:
        yield b"{" * MAX_BODY
        yield b"}"

    _error(client.post(server.webhook_url, content=body(), headers=headers), 413, "body_too_large")


def test_body_at_the_cap_is_accepted(
    server: ServerProcess, sender: Sender, client: httpx.Client
) -> None:
    prefix = b'{"request_id": "http-at-cap", "status": "OK", "payload": "'
    body = prefix + b"a" * (MAX_BODY - len(prefix) - 2) + b'"}'
    assert len(body) == MAX_BODY
    signed_body, headers = sender.signed("http-at-cap", body=body)
    response = client.post(server.webhook_url, content=signed_body, headers=headers)
    assert response.status_code == 200, response.text


def test_healthz_readyz_metrics(server: ServerProcess, client: httpx.Client) -> None:
    assert client.get(server.url + "/healthz").status_code == 200
    ready = client.get(server.url + "/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"
    metrics = client.get(server.url + "/metrics")
    assert metrics.status_code == 200
    assert "falhook_deliveries" in metrics.text


def test_503_while_jwks_is_down_at_startup_then_200(
    spawn, sender: Sender, client: httpx.Client, fal_key
) -> None:
    with JWKSServer(fal_key) as jwks:
        jwks.fail(503)
        # The retry below comes at once: no refresh interval to wait out on a cold cache.
        server = spawn(jwks=jwks.url, env={"FALHOOK_JWKS_REFRESH_SECONDS": "0"})
        assert client.get(server.url + "/healthz").status_code == 200
        _error(client.get(server.url + "/readyz"), 503, "keys_unavailable")
        _error(sender.post(client, server.webhook_url, "http-503"), 503, "keys_unavailable")
        assert server.row("http-503") is None  # nothing stored, so fal's retry is the first
        jwks.fail(None)
        response = sender.post(client, server.webhook_url, "http-503")
        assert response.status_code == 200, response.text
        assert response.json() == {"request_id": "http-503", "duplicate": False}
        assert client.get(server.url + "/readyz").status_code == 200
        server.wait_records(lambda rs: any(r["request_id"] == "http-503" for r in rs))


def _unknown_count(client: httpx.Client, server: ServerProcess, kind: str) -> float:
    for line in client.get(server.url + "/metrics").text.splitlines():
        if line.startswith(f'falhook_unknown_path_requests_total{{kind="{kind}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_an_unknown_path_leaves_a_count_and_one_log_line_with_a_hint(
    server: ServerProcess, sender: Sender, client: httpx.Client
) -> None:
    near, other = (_unknown_count(client, server, k) for k in ("webhook_path", "other"))
    for _ in range(3):  # fal retrying a delivery sent to a mistyped URL
        response = sender.post(client, server.url + "/webhook/fal", "typo-1")
        _error(response, 404, "not_found")
    _error(client.get(server.url + "/robots.txt"), 404, "not_found")
    assert _unknown_count(client, server, "webhook_path") == near + 3
    assert _unknown_count(client, server, "other") == other + 1
    server.wait_for_log('"path": "/robots.txt"')
    server.wait_for_log('"path": "/webhook/fal"')
    lines = [
        json.loads(line)
        for line in server.log_path.read_text().splitlines()
        if line.startswith("{") and '"request to an unknown path' in line
    ]
    typo = [line for line in lines if line["path"] == "/webhook/fal"]
    assert len(typo) == 1, typo  # once a minute per path, however often it comes
    assert typo[0]["level"] == "warning" and typo[0]["method"] == "POST"
    assert "/webhooks/fal" in typo[0]["hint"] and typo[0]["status"] == 404
    (robots,) = [line for line in lines if line["path"] == "/robots.txt"]
    assert robots["level"] == "info" and "hint" not in robots
