"""The webhook route in-process (TestClient runs the receiver's lifespan): statuses,
JSON error bodies, and no input — bytes or headers — ever yields a 500."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from falhook.receiver import Delivery, Settings, WebhookReceiver
from falhook.receiver.metrics import Metrics
from falhook.receiver.routes import NotFound, _near
from falhook.verify.testing import JWKSServer, fal_body, generate_keypair, sign
from tests.receiver.conftest import USER_ID, Signer

URL = "/webhooks/fal"
MAX_BODY = 1024


@pytest.fixture
def received() -> list[Delivery]:
    return []


@pytest.fixture
def hooks(settings: Settings, received: list[Delivery]) -> WebhookReceiver:
    receiver = WebhookReceiver(settings.replace(max_body_bytes=MAX_BODY, user_id=USER_ID))

    @receiver.on_delivery
    async def collect(delivery: Delivery) -> None:
        received.append(delivery)

    return receiver


@pytest.fixture
def client(hooks: WebhookReceiver) -> Iterator[TestClient]:
    with TestClient(hooks.app, follow_redirects=False) as c:
        yield c


def _assert_error(response: httpx2.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"] == error


def test_new_duplicate_and_trailing_slash(client: TestClient, signer: Signer) -> None:
    body, headers = signer("r-1")
    first = client.post(URL, content=body, headers=headers)
    assert first.status_code == 200
    assert first.json() == {"request_id": "r-1", "duplicate": False}
    second = client.post(URL + "/", content=body, headers=headers)
    assert second.status_code == 200
    assert second.json() == {"request_id": "r-1", "duplicate": True}


def test_callback_gets_the_delivery(
    client: TestClient, signer: Signer, received: list[Delivery]
) -> None:
    big = 2**53 + 1
    body, headers = signer("r-cb", payload={"seed": big}, gateway_request_id="gw-1")
    assert client.post(URL, content=body, headers=headers).status_code == 200
    deadline = time.monotonic() + 10
    while not received:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    delivery = received[0]
    assert delivery.request_id == "r-cb"
    assert delivery.gateway_request_id == "gw-1"
    assert delivery.status == "OK"
    assert delivery.payload == {"seed": big}
    assert delivery.attempt == 1
    assert delivery.raw_body == body
    assert delivery.user_id == USER_ID


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"{", "invalid_json"),
        (b"\xff", "invalid_json"),
        ('{"request_id": "r-400", "status": "OK"}'.encode("utf-16"), "invalid_json"),
        (b"null", "invalid_json"),
        (b"[]", "invalid_json"),
        (b'{"request_id": "r-400", "status": "OK", "payload": NaN}', "invalid_json"),
        (b'{"request_id": "r-400", "status": "OK", "payload": {"x": -Infinity}}', "invalid_json"),
        (b"{}", "missing_request_id"),
        (b'{"request_id": ""}', "missing_request_id"),
        (b'{"request_id": "other", "status": "OK"}', "request_id_mismatch"),
        (b'{"request_id": "r-400", "status": "ok"}', "invalid_status"),
        (b'{"request_id": "r-400", "status": null}', "invalid_status"),
        (b"[" * 5000 + b"]" * 5000, "body_too_large"),
    ],
)
def test_malformed(client: TestClient, signer: Signer, body: bytes, error: str) -> None:
    signed, headers = signer("r-400", body=body)
    status = 413 if error == "body_too_large" else 400
    _assert_error(client.post(URL, content=signed, headers=headers), status, error)


def test_deeply_nested_json_is_400_not_500(
    client: TestClient, hooks: WebhookReceiver, signer: Signer
) -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    with TestClient(
        WebhookReceiver(hooks.settings.replace(max_body_bytes=10**6)).app
    ) as big_client:
        signed, headers = signer("r-deep", body=body)
        response = big_client.post(URL, content=signed, headers=headers)
        _assert_error(response, 400, "invalid_json")
        assert "nested too deeply" in response.json()["detail"]  # not "not valid JSON"


def test_inauthentic(client: TestClient, signer: Signer) -> None:
    body, headers = signer("r-401")
    forged = Signer(generate_keypair(b"\x05" * 32))("r-401")[1]
    _assert_error(client.post(URL, content=body, headers=forged), 401, "invalid_signature")
    missing = {k: v for k, v in headers.items() if k != "X-Fal-Webhook-Signature"}
    _assert_error(client.post(URL, content=body, headers=missing), 401, "missing_header")
    old = sign(body, "r-401", USER_ID, int(time.time()) - 1000, keypair=signer.keypair)
    _assert_error(client.post(URL, content=body, headers=old), 401, "timestamp_too_old")
    future = sign(body, "r-401", USER_ID, int(time.time()) + 1000, keypair=signer.keypair)
    _assert_error(client.post(URL, content=body, headers=future), 401, "timestamp_too_new")
    stranger = Signer(signer.keypair, user_id="someone")("r-401")[1]
    _assert_error(client.post(URL, content=body, headers=stranger), 401, "user_mismatch")
    bad_sig = {**headers, "X-Fal-Webhook-Signature": "zz" * 64}
    _assert_error(client.post(URL, content=body, headers=bad_sig), 401, "malformed_header")


def test_env_user_id_does_not_override_the_receivers_setting(
    settings: Settings, signer: Signer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiver pins its own user id (None = any); the library's env fallback is off."""
    monkeypatch.setenv("FALHOOK_USER_ID", "someone-else")
    with TestClient(WebhookReceiver(settings).app) as c:
        body, headers = signer("r-env-user")
        assert c.post(URL, content=body, headers=headers).status_code == 200


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_wrong_method(client: TestClient, method: str) -> None:
    response = client.request(method, URL)
    _assert_error(response, 405, "method_not_allowed")
    assert response.headers["allow"] == "POST"


def test_content_length_over_the_cap(client: TestClient, signer: Signer) -> None:
    body, headers = signer("r-413", body=b"x" * (MAX_BODY + 1))
    _assert_error(client.post(URL, content=body, headers=headers), 413, "body_too_large")


def test_unknown_paths_are_json_404(client: TestClient) -> None:
    _assert_error(client.get("/nope"), 404, "not_found")
    _assert_error(client.post("/webhooks/fal/extra"), 404, "not_found")


def test_health_ready_metrics(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "dispatch": "running"}
    response = client.get("/metrics")
    assert response.status_code == 200
    assert "falhook_deliveries_received" in response.text


def test_missing_jwks_file_is_503_keys_unavailable(
    settings: Settings, signer: Signer, tmp_path: Path
) -> None:
    hooks = WebhookReceiver(settings.replace(jwks_url=str(tmp_path / "absent.json")))
    with TestClient(hooks.app) as c:
        body, headers = signer("r-503")
        _assert_error(c.post(URL, content=body, headers=headers), 503, "keys_unavailable")
        _assert_error(c.get("/readyz"), 503, "keys_unavailable")


def test_no_key_verifies_answers_name_the_cause(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A signature no key verifies: 401 invalid_signature naming the raw bytes; a fresh one
    within the refresh interval 503 key_refresh_pending (answer, log line and metric label,
    not keys_unavailable); one signed before the keys were fetched 401 again, with no fetch."""
    fal, stranger = generate_keypair(b"\x03" * 32), generate_keypair(b"\x04" * 32)
    with JWKSServer(fal) as jwks:
        hooks = WebhookReceiver(settings.replace(jwks_url=jwks.url, user_id=USER_ID))
        signer = Signer(stranger)
        logged = caplog.at_level("INFO", logger="falhook.deliveries")
        with logged, TestClient(hooks.app) as client:
            body, headers = signer("r-bad-1")
            first = client.post(URL, content=body, headers=headers)
            _assert_error(first, 401, "invalid_signature")
            assert "verify the raw request bytes, not re-serialized JSON" in first.json()["detail"]
            body, headers = signer("r-bad-2")
            _assert_error(
                client.post(URL, content=body, headers=headers), 503, "key_refresh_pending"
            )
            fetched = jwks.requests
            body = fal_body("r-old")
            headers = sign(body, "r-old", USER_ID, int(time.time()) - 60, keypair=stranger)
            _assert_error(client.post(URL, content=body, headers=headers), 401, "invalid_signature")
            assert jwks.requests == fetched  # decided with the keys it had
            scrape = client.get("/metrics").text
    rejected = [r for r in caplog.records if getattr(r, "outcome", None) == "rejected"]
    assert [r.reason for r in rejected] == [  # type: ignore[attr-defined]
        "invalid_signature",
        "key_refresh_pending",
        "invalid_signature",
    ]
    assert 'outcome="rejected",reason="key_refresh_pending"} 1.0' in scrape
    assert 'reason="keys_unavailable"' not in scrape


_HEADER_NAMES = [
    b"x-fal-webhook-request-id",
    b"x-fal-webhook-user-id",
    b"x-fal-webhook-timestamp",
    b"x-fal-webhook-signature",
]
_header_value: st.SearchStrategy[bytes] = st.one_of(
    st.binary(max_size=200).filter(lambda b: b"\r" not in b and b"\n" not in b),
    st.from_regex(rb"\A[0-9]{1,25}\Z"),
    st.from_regex(rb"\A[0-9a-fA-F]{126,130}\Z"),
    st.text(st.characters(codec="latin-1", exclude_characters="\r\n"), max_size=80).map(
        lambda text: text.encode("latin-1")
    ),
)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


def _json_body(request_id: str) -> st.SearchStrategy[bytes]:
    fields = st.fixed_dictionaries(
        {},
        optional={
            "request_id": st.one_of(st.just(request_id), _json_values),
            "status": st.one_of(st.sampled_from(["OK", "ERROR", "ok", ""]), _json_values),
            "payload": _json_values,
            "error": _json_values,
            "payload_error": _json_values,
            "gateway_request_id": _json_values,
        },
    )
    return st.one_of(fields, _json_values).map(lambda v: json.dumps(v).encode())


_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_arbitrary_bytes_and_headers_never_500(client: TestClient) -> None:
    @_FUZZ
    @given(
        body=st.binary(max_size=2 * MAX_BODY),
        headers=st.dictionaries(st.sampled_from(_HEADER_NAMES), _header_value),
    )
    def check(body: bytes, headers: dict[bytes, bytes]) -> None:
        response = client.post(URL, content=body, headers=headers)
        assert response.status_code in {400, 401, 413}, response.text
        assert isinstance(response.json()["error"], str)

    check()


def test_arbitrary_signed_bodies_never_500(client: TestClient, signer: Signer) -> None:
    @_FUZZ
    @given(body=st.one_of(st.binary(max_size=2 * MAX_BODY), _json_body("r-fuzz")))
    def check(body: bytes) -> None:
        signed, headers = signer("r-fuzz", body=body)
        response = client.post(URL, content=signed, headers=headers)
        assert response.status_code in {200, 400, 413}, response.text
        data = response.json()
        if response.status_code == 200:
            assert data["request_id"] == "r-fuzz"
        else:
            assert isinstance(data["error"], str)

    check()


@pytest.mark.parametrize("log_payloads", [False, True])
def test_one_log_line_per_outcome_payload_only_when_asked(
    settings: Settings, signer: Signer, caplog: pytest.LogCaptureFixture, log_payloads: bool
) -> None:
    hooks = WebhookReceiver(settings.replace(log_payloads=log_payloads))
    body, headers = signer("r-log", payload={"secret": "prompt text"})
    with caplog.at_level("INFO", logger="falhook.deliveries"), TestClient(hooks.app) as client:
        assert client.post(URL, content=body, headers=headers).status_code == 200
        assert client.post(URL, content=b"{}", headers={}).status_code == 401
    records = [r for r in caplog.records if r.name == "falhook.deliveries"]
    accepted = [r for r in records if getattr(r, "outcome", None) == "accepted"]
    rejected = [r for r in records if getattr(r, "outcome", None) == "rejected"]
    assert [r.request_id for r in accepted] == ["r-log"]  # type: ignore[attr-defined]
    assert [r.reason for r in rejected] == ["missing_header"]  # type: ignore[attr-defined]
    assert (getattr(accepted[0], "body", None) == body.decode()) is log_payloads
    assert all("prompt text" not in r.getMessage() for r in records)


def _unknown_counts(client: TestClient) -> dict[str, float]:
    counts = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("falhook_unknown_path_requests_total{"):
            kind = line.split('kind="')[1].split('"')[0]
            counts[kind] = float(line.rsplit(" ", 1)[1])
    return counts


def test_unknown_paths_are_counted_and_logged_once_a_minute_with_a_hint(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="falhook.receiver"):
        for _ in range(3):
            _assert_error(client.post("/webhook/fal", content=b"{}"), 404, "not_found")
        _assert_error(client.get("/nope"), 404, "not_found")
        _assert_error(client.post("/webhooks/fal/x"), 404, "not_found")
        _assert_error(client.get("/webhooks"), 404, "not_found")
    lines = [r for r in caplog.records if r.getMessage().startswith("request to an unknown path")]
    by_path = {r.path: r for r in lines}  # type: ignore[attr-defined]
    assert [r.path for r in lines] == [  # type: ignore[attr-defined]
        "/webhook/fal",  # once, though it came three times
        "/nope",
        "/webhooks/fal/x",
        "/webhooks",
    ]
    hinted = by_path["/webhook/fal"]
    assert hinted.levelname == "WARNING" and hinted.method == "POST"  # type: ignore[attr-defined]
    assert "/webhooks/fal" in hinted.hint  # type: ignore[attr-defined]
    assert hinted.status == 404  # type: ignore[attr-defined]
    assert "hint" in by_path["/webhooks"].__dict__ and "hint" in by_path["/webhooks/fal/x"].__dict__
    assert by_path["/nope"].levelname == "INFO" and "hint" not in by_path["/nope"].__dict__
    assert _unknown_counts(client) == {"webhook_path": 5.0, "other": 1.0}


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _not_found(**kwargs: Any) -> tuple[NotFound, _Clock]:
    clock = _Clock()
    return NotFound(Metrics(), clock=clock, **kwargs), clock


def _logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.path for r in caplog.records if hasattr(r, "path")]


def _request(handler: NotFound, path: str) -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        return None

    scope: dict[str, Any] = {
        "type": "http",
        "method": "GET",
        "path": path,
        "headers": [],
        "client": None,
    }
    asyncio.run(handler(scope, receive, send))  # type: ignore[arg-type]


def test_a_path_is_logged_again_after_the_window(caplog: pytest.LogCaptureFixture) -> None:
    handler, clock = _not_found(window=60.0)
    with caplog.at_level("INFO", logger="falhook.receiver"):
        _request(handler, "/a")
        clock.now += 59
        _request(handler, "/a")
        clock.now += 2
        _request(handler, "/a")
    assert _logged(caplog) == ["/a", "/a"]


def test_the_paths_remembered_are_bounded_and_a_flood_is_counted_not_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = Metrics()
    clock = _Clock()
    handler = NotFound(metrics, window=60.0, tracked=3, clock=clock)
    with caplog.at_level("INFO", logger="falhook.receiver"):
        for path in ["/1", "/2", "/3", "/4"]:  # the fourth: all three logged within the minute
            _request(handler, path)
        assert _logged(caplog) == ["/1", "/2", "/3"]
        clock.now += 61
        _request(handler, "/4")  # the oldest is forgotten to make room for it
        clock.now += 1
        _request(handler, "/1")  # forgotten, so logged again
        _request(handler, "/4")  # remembered: not again within the minute
    assert _logged(caplog) == ["/1", "/2", "/3", "/4", "/1"]
    assert len(handler._logged) == 3
    assert 'falhook_unknown_path_requests_total{kind="other"} 7.0' in metrics.render().decode()


@pytest.mark.parametrize(
    ("path", "near"),
    [
        ("/webhook/fal", True),
        ("/webhooks/fal/x", True),
        ("/webhooks", True),
        ("/api/webhooks/fal", True),
        ("/WEBHOOKS/FAL", True),
        ("/hooks/fal", True),
        ("/webhooks/fla", True),
        ("/", False),
        ("/wp-login.php", False),
        ("/favicon.ico", False),
        ("/metrics/", False),
    ],
)
def test_what_looks_like_a_mistyped_webhook_path(path: str, near: bool) -> None:
    assert _near(path, "/webhooks/fal") is near
