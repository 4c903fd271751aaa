"""The fake fal queue against its own contract, over real HTTP with httpx."""

from __future__ import annotations

import hashlib
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from nacl.signing import SigningKey

from tests.fakes.fal_queue import (
    DEFAULT_OUTPUT,
    PAYLOAD_NOT_SERIALIZABLE,
    FakeFalQueue,
    ed25519_signer,
    parse_endpoint_id,
    wait_until,
)

KEY = "fal-test-key"
AUTH = {"Authorization": f"Key {KEY}"}
SEED = b"\x05" * 32
USER_ID = "user-fake-queue"


@pytest.fixture
def fake() -> Iterator[FakeFalQueue]:
    with FakeFalQueue(api_key=KEY, forbidden_keys={"read-only-key"}) as queue:
        yield queue


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with httpx.Client(headers=AUTH, timeout=5.0, trust_env=False) as http:
        yield http


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A tiny webhook receiver: records every POST, answers `status` (200 by default)."""

    url: str
    received: list[Received] = field(default_factory=list)
    status: int = 200


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    lock = threading.Lock()
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            with lock:
                state.received.append(
                    Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
            self.send_response(state.status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/webhooks/fal"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def submit(
    client: httpx.Client,
    fake: FakeFalQueue,
    endpoint_id: str = "fal-ai/flux/dev",
    **params: str,
) -> dict[str, Any]:
    response = client.post(f"{fake.url}/{endpoint_id}", params=params, json={"prompt": "dog"})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# ---------------------------------------------------------------------------- endpoint ids


@pytest.mark.parametrize(
    ("endpoint_id", "owner", "alias", "path", "prefix"),
    [
        ("fal-ai/flux/dev", "fal-ai", "flux", "dev", "fal-ai/flux"),
        ("fal-ai/fast-sdxl", "fal-ai", "fast-sdxl", None, "fal-ai/fast-sdxl"),
        ("fal-ai/flux-pro/v1.1/ultra", "fal-ai", "flux-pro", "v1.1/ultra", "fal-ai/flux-pro"),
        ("workflows/me/wf/run", "me", "wf", "run", "workflows/me/wf"),
        ("123-my-app", "123", "my-app", None, "123/my-app"),
    ],
)
def test_parse_endpoint_id_like_fal_js(
    endpoint_id: str, owner: str, alias: str, path: str | None, prefix: str
) -> None:
    parsed = parse_endpoint_id(endpoint_id)
    assert (parsed.owner, parsed.alias, parsed.path) == (owner, alias, path)
    assert parsed.app_prefix == prefix


def test_parse_endpoint_id_rejects_a_bare_name() -> None:
    with pytest.raises(ValueError, match="invalid app id"):
        parse_endpoint_id("flux")


# ------------------------------------------------------------------------------- submit


def test_submit_with_a_sub_path_returns_owner_app_urls(
    fake: FakeFalQueue, client: httpx.Client
) -> None:
    headers = {
        "X-Fal-Queue-Priority": "low",
        "X-Fal-Runner-Hint": "session-1",
        "X-Fal-Request-Timeout": "30",
        "X-Fal-Store-IO": "0",
    }
    response = client.post(
        f"{fake.url}/fal-ai/flux/dev",
        params={"fal_webhook": "https://example.test/hook?token=a b"},
        json={"prompt": "dog"},
        headers=headers,
    )
    assert response.status_code == 200
    body = response.json()
    rid = body["request_id"]
    assert str(uuid.UUID(rid)) == rid
    base = f"{fake.url}/fal-ai/flux/requests/{rid}"
    assert body == {
        "status": "IN_QUEUE",
        "request_id": rid,
        "response_url": base,
        "status_url": f"{base}/status",
        "cancel_url": f"{base}/cancel",
        "queue_position": 0,
    }

    req = fake.get(rid)
    assert req.endpoint_id == "fal-ai/flux/dev"
    assert req.endpoint.path == "dev"
    assert req.input == {"prompt": "dog"}
    assert req.webhook_url == "https://example.test/hook?token=a b"
    assert req.platform_headers == {k.lower(): v for k, v in headers.items()}

    # A second request to the same app waits behind the first.
    assert submit(client, fake, "fal-ai/flux/schnell")["queue_position"] == 1
    assert submit(client, fake, "fal-ai/other")["queue_position"] == 0

    # The URLs work; the full endpoint id (with the sub-path) does not (strict_paths).
    assert client.get(body["status_url"]).status_code == 202
    wrong = client.get(f"{fake.url}/fal-ai/flux/dev/requests/{rid}/status")
    assert wrong.status_code == 404
    assert "detail" in wrong.json()


def test_submit_of_a_bare_name_is_404(fake: FakeFalQueue, client: httpx.Client) -> None:
    assert client.post(f"{fake.url}/flux", json={}).status_code == 404


# ------------------------------------------------------------------------------- status


def test_status_progresses_with_documented_codes(fake: FakeFalQueue, client: httpx.Client) -> None:
    body = submit(client, fake)
    rid, status_url = body["request_id"], body["status_url"]

    queued = client.get(status_url)
    assert queued.status_code == 202
    assert queued.json()["status"] == "IN_QUEUE"
    assert queued.json()["queue_position"] == 0
    assert "error" not in queued.json()

    assert fake.advance(rid) == "IN_PROGRESS"
    running = client.get(status_url, params={"logs": "1"})
    assert running.status_code == 202
    assert running.json()["status"] == "IN_PROGRESS"
    assert [log["message"] for log in running.json()["logs"]] == ["Request started by FakeFalQueue"]
    assert "queue_position" not in running.json()
    assert client.get(status_url).json()["logs"] is None

    fake.complete(rid, {"images": [], "seed": 1})
    done = client.get(status_url)
    assert done.status_code == 200
    assert done.json()["status"] == "COMPLETED"
    assert done.json()["metrics"] == {"inference_time": 0.5}
    assert "error" not in done.json()
    assert fake.status_polls(rid) == 4
    with pytest.raises(ValueError, match="already COMPLETED"):
        fake.advance(rid)


def test_status_advances_automatically_after_n_polls(client: httpx.Client) -> None:
    with FakeFalQueue(api_key=KEY, auto_advance_after=2) as fake:
        rid = submit(client, fake)["request_id"]
        fake.plan(rid, {"answer": 42})
        status_url = fake.request_urls(rid)["status_url"]
        seen = [
            (r.status_code, r.json()["status"]) for r in (client.get(status_url) for _ in range(5))
        ]
        assert seen == [
            (202, "IN_QUEUE"),
            (202, "IN_QUEUE"),
            (202, "IN_PROGRESS"),
            (202, "IN_PROGRESS"),
            (200, "COMPLETED"),
        ]
        assert client.get(fake.request_urls(rid)["response_url"]).json() == {"answer": 42}


def test_failed_request_is_completed_with_error_and_error_type(
    fake: FakeFalQueue, client: httpx.Client
) -> None:
    rid = submit(client, fake)["request_id"]
    fake.complete(rid, error="Request timed out", error_type="request_timeout")
    urls = fake.request_urls(rid)

    status = client.get(urls["status_url"])
    assert status.status_code == 200
    assert status.json()["status"] == "COMPLETED"
    assert status.json()["error"] == "Request timed out"
    assert status.json()["error_type"] == "request_timeout"

    result = client.get(urls["response_url"])
    assert result.status_code == 504
    assert result.json() == {"detail": "Request timed out", "error_type": "request_timeout"}
    assert result.headers["x-fal-error-type"] == "request_timeout"


def test_model_validation_error_is_returned_as_is(fake: FakeFalQueue, client: httpx.Client) -> None:
    detail = [{"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"}]
    rid = fake.create("fal-ai/flux/dev")
    fake.complete(
        rid, error="Invalid status code: 422", status_code=422, error_body={"detail": detail}
    )
    result = client.get(fake.request_urls(rid)["response_url"])
    assert result.status_code == 422
    assert result.json() == {"detail": detail}
    assert "x-fal-error-type" not in result.headers


# ------------------------------------------------------------------------------- result


def test_result_before_completion_then_ok(fake: FakeFalQueue, client: httpx.Client) -> None:
    rid = submit(client, fake)["request_id"]
    response_url = fake.request_urls(rid)["response_url"]

    early = client.get(response_url)
    assert early.status_code == 400
    assert early.json() == {"detail": "Request is still in progress"}

    fake.complete(rid)
    ok = client.get(response_url)
    assert ok.status_code == 200
    assert ok.json() == DEFAULT_OUTPUT
    assert ok.json()["seed"] == 17454220438242315174  # > 2**53 survives
    assert fake.result_fetches(rid) == 2


def test_expired_result(fake: FakeFalQueue, client: httpx.Client) -> None:
    rid = fake.create("fal-ai/flux/dev", state="COMPLETED", output={"x": 1})
    urls = fake.request_urls(rid)
    assert client.get(urls["response_url"]).status_code == 200
    fake.expire(rid)
    gone = client.get(urls["response_url"])
    assert gone.status_code == 404
    assert "detail" in gone.json()
    assert client.get(urls["status_url"]).json()["status"] == "COMPLETED"

    fake.expire(rid, status_code=410, detail="Result expired")
    assert client.get(urls["response_url"]).status_code == 410


def test_unknown_request_id_is_404(fake: FakeFalQueue, client: httpx.Client) -> None:
    base = f"{fake.url}/fal-ai/flux/requests/{uuid.uuid4()}"
    assert client.get(f"{base}/status").status_code == 404
    assert client.get(base).status_code == 404
    cancel = client.put(f"{base}/cancel")
    assert (cancel.status_code, cancel.json()) == (404, {"status": "NOT_FOUND"})


def test_cancel(fake: FakeFalQueue, client: httpx.Client) -> None:
    queued = fake.create("fal-ai/flux/dev")
    cancel = client.put(fake.request_urls(queued)["cancel_url"])
    assert (cancel.status_code, cancel.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    assert fake.get(queued).cancel_requested
    assert fake.get(queued).error_type == "client_cancelled"

    done = fake.create("fal-ai/flux/dev", state="COMPLETED")
    again = client.put(fake.request_urls(done)["cancel_url"])
    assert (again.status_code, again.json()) == (400, {"status": "ALREADY_COMPLETED"})


# ------------------------------------------------------------------------------- auth


def test_auth_401_and_403(fake: FakeFalQueue) -> None:
    rid = fake.create("fal-ai/flux/dev")
    status_url = fake.request_urls(rid)["status_url"]
    cases = {
        None: 401,
        "Bearer fal-test-key": 401,
        "Key wrong-key": 401,
        "Key read-only-key": 403,
        f"Key {KEY}": 202,
    }
    with httpx.Client(timeout=5.0, trust_env=False) as anonymous:
        for authorization, expected in cases.items():
            headers = {} if authorization is None else {"Authorization": authorization}
            response = anonymous.get(status_url, headers=headers)
            assert response.status_code == expected, authorization
            if expected >= 400:
                assert isinstance(response.json()["detail"], str)
        denied = anonymous.post(f"{fake.url}/fal-ai/flux/dev", json={})
        assert denied.status_code == 401
    assert fake.request_ids() == [rid]  # the rejected submit created nothing
    assert [r.status_code for r in fake.requests("status")] == [401, 401, 401, 403, 202]


# ---------------------------------------------------------------------------- failures


def test_429_with_retry_after_then_recovers(fake: FakeFalQueue, client: httpx.Client) -> None:
    rid = fake.create("fal-ai/flux/dev")
    status_url = fake.request_urls(rid)["status_url"]
    fake.fail(429, route="status", times=2)

    for _ in range(2):
        limited = client.get(status_url)
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "1"
        assert "detail" in limited.json()
    assert client.get(status_url).status_code == 202
    assert fake.status_polls(rid) == 3


@pytest.mark.parametrize("code", [401, 403, 404, 500, 502, 503])
def test_injected_failures_per_route_and_global(
    fake: FakeFalQueue, client: httpx.Client, code: int
) -> None:
    rid = fake.create("fal-ai/flux/dev", state="COMPLETED")
    urls = fake.request_urls(rid)
    fake.fail(code, route="result")
    assert client.get(urls["response_url"]).status_code == code
    assert client.get(urls["status_url"]).status_code == 200  # other routes unaffected
    fake.clear_failures()
    assert client.get(urls["response_url"]).status_code == 200

    fake.fail(code, retry_after=7)
    submitted = client.post(f"{fake.url}/fal-ai/flux/dev", json={})
    assert submitted.status_code == code
    assert submitted.headers["retry-after"] == "7"
    assert client.get(urls["status_url"]).status_code == code
    fake.clear_failures()
    assert client.get(urls["status_url"]).status_code == 200


def test_down_then_up_on_the_same_port(fake: FakeFalQueue, client: httpx.Client) -> None:
    rid = fake.create("fal-ai/flux/dev")
    status_url = fake.request_urls(rid)["status_url"]
    url_before = fake.url
    assert client.get(status_url).status_code == 202

    fake.down()
    assert not fake.is_up
    with pytest.raises(httpx.ConnectError):
        client.get(status_url)

    fake.up()
    assert fake.is_up
    assert fake.url == url_before
    assert client.get(status_url).status_code == 202  # state survived the outage
    fake.complete(rid)
    assert client.get(status_url).status_code == 200


# ---------------------------------------------------------------------------- webhooks


def verify_signature(headers: dict[str, str], body: bytes) -> None:
    """Check the W§3 scheme with pynacl: what a receiver would do."""
    message = "\n".join(
        [
            headers["x-fal-webhook-request-id"],
            headers["x-fal-webhook-user-id"],
            headers["x-fal-webhook-timestamp"],
            hashlib.sha256(body).hexdigest(),
        ]
    ).encode()
    signature = bytes.fromhex(headers["x-fal-webhook-signature"])
    SigningKey(SEED).verify_key.verify(message, signature)


def test_send_webhook_ok_to_a_local_receiver(client: httpx.Client, receiver: Receiver) -> None:
    with FakeFalQueue(api_key=KEY, signer=ed25519_signer(SEED, USER_ID)) as fake:
        rid = submit(client, fake, fal_webhook=receiver.url)["request_id"]
        fake.complete(rid)
        assert fake.send_webhook(rid) == 200

    [got] = receiver.received
    assert got.path == "/webhooks/fal"
    assert got.headers["content-type"] == "application/json"
    assert got.headers["x-fal-webhook-request-id"] == rid
    assert got.headers["x-fal-webhook-user-id"] == USER_ID
    verify_signature(got.headers, got.body)
    assert json.loads(got.body) == {
        "request_id": rid,
        "gateway_request_id": rid,
        "status": "OK",
        "payload": DEFAULT_OUTPUT,
        "error": None,
        "payload_error": None,
    }
    assert b'"seed": 17454220438242315174' in got.body  # Python json.dumps style, exact int
    [delivery] = fake.webhook_deliveries
    assert (delivery.request_id, delivery.status_code, delivery.body) == (rid, 200, got.body)


def test_send_webhook_error_and_payload_error(client: httpx.Client, receiver: Receiver) -> None:
    with FakeFalQueue(api_key=KEY, signer=ed25519_signer(SEED, USER_ID)) as fake:
        failed = fake.create("fal-ai/flux/dev", webhook_url=receiver.url)
        fake.complete(failed, error="Runner disconnected", error_type="runner_disconnected")
        ok = fake.create("fal-ai/flux/dev", webhook_url=receiver.url, gateway_request_id="gw-2")
        fake.complete(ok)

        receiver.status = 500
        assert fake.send_webhook(failed) == 500
        receiver.status = 200
        assert fake.send_webhook(ok, payload_error=PAYLOAD_NOT_SERIALIZABLE) == 200

    error_body, oversized_body = (json.loads(r.body) for r in receiver.received)
    assert error_body == {
        "request_id": failed,
        "gateway_request_id": failed,
        "status": "ERROR",
        "payload": {"detail": "Runner disconnected", "error_type": "runner_disconnected"},
        "error": "Invalid status code: 503",
        "payload_error": None,
    }
    assert oversized_body == {
        "request_id": ok,
        "gateway_request_id": "gw-2",
        "status": "OK",
        "payload": None,
        "error": None,
        "payload_error": PAYLOAD_NOT_SERIALIZABLE,
    }
    for got in receiver.received:
        verify_signature(got.headers, got.body)


def test_auto_webhook_withheld_then_sent_late(client: httpx.Client, receiver: Receiver) -> None:
    signer = ed25519_signer(SEED, USER_ID)
    with FakeFalQueue(api_key=KEY, signer=signer, auto_webhook=True) as fake:
        sent = submit(client, fake, fal_webhook=receiver.url)["request_id"]
        withheld = submit(client, fake, fal_webhook=receiver.url)["request_id"]
        fake.withhold_webhook(withheld)
        fake.complete(sent)
        fake.complete(withheld)
        fake.wait_for_webhooks(1)
        assert [d.request_id for d in fake.webhook_deliveries] == [sent]
        assert [json.loads(r.body)["request_id"] for r in receiver.received] == [sent]

        assert fake.send_webhook(withheld) == 200  # the late delivery
        assert [json.loads(r.body)["request_id"] for r in receiver.received] == [sent, withheld]


def test_send_webhook_requires_a_completed_request_with_a_url(fake: FakeFalQueue) -> None:
    rid = fake.create("fal-ai/flux/dev", webhook_url="http://127.0.0.1:9/hook")
    with pytest.raises(ValueError, match="not COMPLETED"):
        fake.send_webhook(rid)
    no_url = fake.create("fal-ai/flux/dev", state="COMPLETED")
    with pytest.raises(ValueError, match="no fal_webhook URL"):
        fake.send_webhook(no_url)


# ------------------------------------------------------------------------------- log


def test_request_log_and_counts(fake: FakeFalQueue, client: httpx.Client) -> None:
    rid = submit(client, fake)["request_id"]
    urls = fake.request_urls(rid)
    client.get(urls["status_url"], params={"logs": "1"})
    client.get(urls["response_url"])
    client.delete(urls["response_url"])

    counts = fake.counts()
    assert counts["submit"] == counts["status"] == counts["result"] == counts["other"] == 1
    assert counts["cancel"] == 0
    first, poll = fake.requests()[:2]
    assert (first.method, first.path, first.route, first.request_id) == (
        "POST",
        "/fal-ai/flux/dev",
        "submit",
        rid,
    )
    assert first.json() == {"prompt": "dog"}
    assert first.headers["authorization"] == f"Key {KEY}"
    assert (poll.query, poll.params, poll.status_code) == ("logs=1", {"logs": "1"}, 202)
    assert first.monotonic <= poll.monotonic

    # A concurrent poller (its own client) is seen deterministically through wait_for_requests.
    def poll_three_times() -> None:
        with httpx.Client(headers=AUTH, timeout=5.0, trust_env=False) as poller:
            for _ in range(3):
                poller.get(urls["status_url"])

    thread = threading.Thread(target=poll_three_times)
    thread.start()
    fake.wait_for_requests(4, "status", request_id=rid)
    thread.join(5)
    assert fake.status_polls(rid) == 4
    fake.clear_log()
    assert fake.count() == 0


def test_wait_until_times_out() -> None:
    with pytest.raises(AssertionError, match="timed out"):
        wait_until(lambda: False, timeout=0.05, what="nothing")


def test_wrong_methods_on_queue_paths_are_405(fake: FakeFalQueue, client: httpx.Client) -> None:
    rid = fake.create("fal-ai/flux/dev")
    urls = fake.request_urls(rid)
    assert client.post(urls["status_url"], json={}).status_code == 405
    assert client.get(urls["cancel_url"]).status_code == 405
    assert fake.request_ids() == [rid]  # a POST to a queue path is not a submit
    with pytest.raises(ValueError, match="unknown route"):
        fake.fail(500, route="nope")  # type: ignore[arg-type]


def test_result_answered_raw(fake: FakeFalQueue, client: httpx.Client) -> None:
    rid = fake.create("fal-ai/flux/dev", state="COMPLETED", output={"x": 1})
    urls = fake.request_urls(rid)
    fake.answer_result_raw(rid, b"<html>Bad gateway</html>", content_type="text/html")
    page = client.get(urls["response_url"])
    assert page.status_code == 200 and page.text == "<html>Bad gateway</html>"
    assert page.headers["content-type"].startswith("text/html")
    fake.answer_result_raw(rid, lambda: iter([b'{"x": ', b"1}"]))
    assert client.get(urls["response_url"]).json() == {"x": 1}
    assert client.get(urls["status_url"]).json()["status"] == "COMPLETED"
