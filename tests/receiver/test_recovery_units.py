"""Recovery's pure parts: queue URLs (fal-js parseEndpointId), what fal's answers mean,
poll backoff and Retry-After."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from falhook.receiver.errors import QueueError, QueueFailure
from falhook.receiver.recovery.client import QueueAnswer, retry_after_seconds
from falhook.receiver.recovery.transitions import (
    QueueStatus,
    RecoveredBody,
    body_with_payload,
    delivery_body,
    poll_delay,
    read_status,
)
from falhook.receiver.recovery.urls import (
    parse_endpoint_id,
    request_urls,
    same_origin,
    submit_url,
)
from tests.fakes.fal_queue import parse_endpoint_id as fake_parse

Q = "https://queue.fal.run"


@pytest.mark.parametrize(
    ("endpoint", "app", "full"),
    [
        ("fal-ai/flux/dev", "fal-ai/flux", "fal-ai/flux/dev"),
        ("fal-ai/flux", "fal-ai/flux", "fal-ai/flux"),
        ("fal-ai/flux-pro/v1.1-ultra", "fal-ai/flux-pro", "fal-ai/flux-pro/v1.1-ultra"),
        ("fal-ai/fast-sdxl/image-to-image/x", "fal-ai/fast-sdxl", None),
        ("workflows/me/my-flow", "workflows/me/my-flow", None),
        ("comfy/me/wf/run", "comfy/me/wf", None),
        ("12345-my-app", "12345/my-app", "12345/my-app"),
        ("/fal-ai/flux/dev/", "fal-ai/flux", "fal-ai/flux/dev"),
    ],
)
def test_endpoint_ids_split_like_fal_js(endpoint: str, app: str, full: str | None) -> None:
    parsed = parse_endpoint_id(endpoint)
    assert parsed.app == app
    assert parsed.full == (full or endpoint.strip("/"))
    assert fake_parse(endpoint).app_prefix == app  # the fake's independent reading agrees


def test_status_and_result_urls_use_owner_app_only() -> None:
    urls = request_urls(Q, "fal-ai/flux/dev", "abc-123")
    assert urls.status_url == "https://queue.fal.run/fal-ai/flux/requests/abc-123/status"
    assert urls.response_url == "https://queue.fal.run/fal-ai/flux/requests/abc-123"
    assert submit_url(Q + "/", "fal-ai/flux/dev") == "https://queue.fal.run/fal-ai/flux/dev"
    odd = request_urls(Q, "fal-ai/flux", "a/b?c")
    assert odd.response_url.endswith("/requests/a%2Fb%3Fc")


@pytest.mark.parametrize(
    "bad", ["", "flux", "fal-ai//dev", "fal-ai/flux/../x", "fal-ai/flux?x=1", "a b/c", "-x/y"]
)
def test_unusable_endpoint_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="not a fal endpoint id"):
        parse_endpoint_id(bad)


def test_the_key_goes_only_to_the_queue_host() -> None:
    assert same_origin("https://queue.fal.run/a/b/requests/1", Q)
    assert not same_origin("https://evil.example/a", Q)
    assert not same_origin("http://queue.fal.run/a", Q)


def test_poll_delay_doubles_from_one_second_to_the_cap() -> None:
    assert [poll_delay(n, 30) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert poll_delay(1, 0.1) == 0.1


def test_retry_after_seconds_and_dates() -> None:
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds("0.5") == 0.5
    assert retry_after_seconds(None) is None
    assert retry_after_seconds("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=50), usegmt=True)
    assert 45 < (retry_after_seconds(later) or 0) <= 50
    # fal's larger results are kept about 6 minutes: an hour's wait (or an endless one)
    # would lose them, so no Retry-After is obeyed for more than a minute.
    far = format_datetime(datetime.now(UTC) + timedelta(hours=2), usegmt=True)
    for value in ("3600", "1e400", "inf", far):
        assert retry_after_seconds(value) == 60.0
    assert retry_after_seconds("nan") is None
    assert retry_after_seconds("-5") == 0.0


def answer(code: int, body: object = None, error_type: str | None = None) -> QueueAnswer:
    return QueueAnswer(code, body, error_type, None)


def test_read_status() -> None:
    assert read_status(answer(202, {"status": "IN_QUEUE", "queue_position": 3})).status == (
        "IN_QUEUE"
    )
    done = read_status(answer(200, {"status": "COMPLETED", "error": None}))
    assert done.completed and not done.failed and done.error_json() is None
    failed = read_status(
        answer(200, {"status": "COMPLETED", "error": "timed out", "error_type": "request_timeout"})
    )
    assert failed.failed
    assert json.loads(failed.error_json() or "") == {
        "error": "timed out",
        "error_type": "request_timeout",
    }
    for code, failure in [
        (401, QueueFailure.UNAUTHORIZED),
        (403, QueueFailure.FORBIDDEN),
        (404, QueueFailure.NOT_FOUND),
        (429, QueueFailure.RATE_LIMITED),
        (503, QueueFailure.SERVER_ERROR),
    ]:
        with pytest.raises(QueueError) as caught:
            read_status(answer(code, {"detail": "x"}))
        assert caught.value.failure is failure
    with pytest.raises(QueueError) as bad:
        read_status(answer(200, {"status": "FAILED"}))  # not one of fal's states
    assert bad.value.failure.transient


def body(recovered: RecoveredBody) -> dict[str, object]:
    data: dict[str, object] = json.loads(recovered.body)
    assert (recovered.status, recovered.error) == (data["status"], data["error"])
    return data


def test_a_result_becomes_an_ok_delivery_shaped_like_fals_webhook() -> None:
    out = body(delivery_body("r1", None, answer(200, {"images": [], "seed": 2**64 - 1})))
    assert out == {
        "request_id": "r1",
        "gateway_request_id": "r1",
        "status": "OK",
        "payload": {"images": [], "seed": 2**64 - 1},
        "error": None,
        "payload_error": None,
    }


def test_a_failed_request_becomes_an_error_delivery() -> None:
    note = QueueStatus("COMPLETED", "Request timed out", "request_timeout").error_json()
    detail = {"detail": "Request timed out", "error_type": "request_timeout"}
    out = body(delivery_body("r1", note, answer(504, detail, "request_timeout")))
    assert out["status"] == "ERROR" and out["payload"] == detail
    assert out["error"] == "Request timed out" and out["error_type"] == "request_timeout"
    # The result is gone, but the status said how it failed: still an ERROR delivery.
    gone = body(delivery_body("r1", note, answer(404, {"detail": "Request not found"})))
    assert gone["status"] == "ERROR" and gone["error"] == "Request timed out"
    # A validation error answered by the result URL, with nothing from the status.
    invalid = {"detail": [{"loc": ["body", "prompt"], "msg": "field required"}]}
    out = body(delivery_body("r1", None, answer(422, invalid)))
    assert out["status"] == "ERROR" and out["error"] == "Invalid status code: 422"
    assert out["payload"] == invalid


def test_a_result_kept_as_fal_sent_it_has_the_shape_of_one_written_out() -> None:
    raw = b'{"seed": 18446744073709551615, "images": [], "b": 1}'
    kept = delivery_body("r1", None, QueueAnswer(200, json.loads(raw), None, None, raw))
    written = delivery_body("r1", None, answer(200, json.loads(raw)))
    assert body(kept) == body(written)
    assert kept.body == written.body.replace(
        b'{"b": 1, "images": [], "seed": 18446744073709551615}', raw
    )


def test_a_payload_spliced_into_any_body_keeps_its_shape() -> None:
    raw = rb'{"z": [1, 2], "a": "\u00e9"}'
    for data in ({"request_id": "r", "status": "OK"}, {"a": 1}, {"z": None}, {}):
        spliced = body_with_payload({**data, "payload": json.loads(raw)}, raw)
        assert json.loads(spliced) == {**data, "payload": json.loads(raw)}
        assert raw in spliced


@pytest.mark.parametrize("text", ["<html>Bad gateway</html>", '{"images": [', "done", None])
def test_a_result_that_is_not_a_json_object_is_a_bad_answer(text: str | None) -> None:
    with pytest.raises(QueueError) as caught:
        delivery_body("r1", None, answer(200, text))
    assert caught.value.failure is QueueFailure.BAD_ANSWER and caught.value.failure.transient


@pytest.mark.parametrize(
    ("code", "failure"),
    [
        (404, QueueFailure.RESULT_GONE),
        (401, QueueFailure.UNAUTHORIZED),
        (403, QueueFailure.FORBIDDEN),
        (429, QueueFailure.RATE_LIMITED),
        (502, QueueFailure.SERVER_ERROR),
        (408, QueueFailure.TRY_AGAIN),
        (409, QueueFailure.TRY_AGAIN),
        # Not a model's error (no error type, not a 422, the status said it succeeded):
        # asked again, never stored as an ERROR.
        (400, QueueFailure.REJECTED),
    ],
)
def test_results_that_are_not_deliveries(code: int, failure: QueueFailure) -> None:
    with pytest.raises(QueueError) as caught:
        delivery_body("r1", None, answer(code, {"detail": "x"}))
    assert caught.value.failure is failure
