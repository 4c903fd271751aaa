"""What fal's answers mean for an expectation: pure functions, no I/O.

- `read_status`: a status answer → the queue state (IN_QUEUE, IN_PROGRESS, COMPLETED with
  or without an error), or a `QueueError` saying whether to try again (429, 5xx) or give up
  (401, 403, 404).
- `delivery_body`: a result answer → the delivery falhook stores, shaped like fal's webhook
  body (``request_id``, ``gateway_request_id``, ``status`` OK/ERROR, ``payload``,
  ``error``, ``payload_error``; ``error_type`` when fal named one) — or a `QueueError`.
- `poll_delay`: how long to wait before the next status poll.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NamedTuple

from falhook.receiver.errors import QueueError, QueueFailure
from falhook.receiver.recovery.client import QueueAnswer, outcome_of

__all__ = [
    "COMPLETED",
    "QueueStatus",
    "RecoveredBody",
    "body_with_payload",
    "delivery_body",
    "error_note",
    "poll_delay",
    "read_status",
]

COMPLETED = "COMPLETED"
_STATES = ("IN_QUEUE", "IN_PROGRESS", COMPLETED)  # fal has no FAILED: see `QueueStatus`
_FIRST_POLL_DELAY = 1.0


def poll_delay(polls: int, cap: float) -> float:
    """Seconds before poll number ``polls + 1``: 1 s, 2 s, 4 s … up to `cap`.

    Short first, because a request polled at all is already overdue; capped, because a
    long-running request (a video) polled every second would spend fal's rate limit.
    """
    return min(cap, _FIRST_POLL_DELAY * 2.0 ** max(0, polls - 1))


@dataclass(frozen=True, slots=True)
class QueueStatus:
    """What a status poll said. A failed request is COMPLETED with `error`/`error_type`."""

    status: str
    error: str | None = None
    error_type: str | None = None

    @property
    def completed(self) -> bool:
        return self.status == COMPLETED

    @property
    def failed(self) -> bool:
        return self.completed and (self.error is not None or self.error_type is not None)

    def error_json(self) -> str | None:
        """The error as the expectation keeps it until the result is fetched."""
        if not self.failed:
            return None
        return json.dumps({"error": self.error, "error_type": self.error_type})


def _failure(answer: QueueAnswer, what: str, failure: QueueFailure) -> QueueError:
    return QueueError(
        failure,
        f"{what} answered {answer.status_code}: {answer.detail()}",
        status_code=answer.status_code,
        retry_after=answer.retry_after,
        body=answer.body,
    )


def read_status(answer: QueueAnswer) -> QueueStatus:
    """The queue state in a status answer (202 while queued or running, 200 when done)."""
    failure = outcome_of(answer.status_code)
    if failure is not None:
        raise _failure(answer, "status", failure)
    body = answer.body
    status = body.get("status") if isinstance(body, dict) else None
    if status not in _STATES:
        raise QueueError(
            QueueFailure.BAD_ANSWER,
            f"status answered {answer.status_code} without a known status: {answer.detail()}",
        )
    assert isinstance(body, dict)
    return QueueStatus(status, _text(body.get("error")), _text(body.get("error_type")))


def error_note(queue_error: str | None) -> tuple[str | None, str | None]:
    """(error, error_type) from what `QueueStatus.error_json` stored."""
    if not queue_error:
        return None, None
    data = json.loads(queue_error)
    return _text(data.get("error")), _text(data.get("error_type"))


class RecoveredBody(NamedTuple):
    """A delivery made from a result answer: its body and the fields stored beside it."""

    body: bytes
    status: str
    error: str | None


def delivery_body(request_id: str, queue_error: str | None, answer: QueueAnswer) -> RecoveredBody:
    """The delivery to store for a result answer; raises QueueError when there is none.

    `queue_error` is what the status said about a failed request (None if it succeeded).
    A failed request becomes an ERROR delivery — from the result URL's error answer, or
    from the status alone when the result is no longer stored. A successful request whose
    result is gone cannot be recovered (``result_gone``); 401/403 end it; any other error
    answer that is not a model's is tried again.
    """
    error, error_type = error_note(queue_error)
    failed = queue_error is not None
    failure = outcome_of(answer.status_code)
    if failure is None:
        if failed:
            return _body(request_id, "ERROR", answer.body, error, error_type)
        if not isinstance(answer.body, dict):
            # An HTML page from a proxy, JSON cut short, a bare string: not a model's
            # result. Asked again (until the TTL), never stored: fal's own webhook, if it
            # comes, must not be taken for a duplicate of it.
            raise QueueError(
                QueueFailure.BAD_ANSWER,
                f"result answered {answer.status_code} without a JSON object: {answer.detail()}",
                status_code=answer.status_code,
            )
        return _body(request_id, "OK", answer.body, None, None, raw=answer.raw)
    if failure in (QueueFailure.UNAUTHORIZED, QueueFailure.FORBIDDEN):
        raise _failure(answer, "result", failure)
    if failure is QueueFailure.RATE_LIMITED:
        raise _failure(answer, "result", failure)
    if failure is QueueFailure.NOT_FOUND:
        if failed:  # the error is known from the status: still worth delivering
            payload = {"detail": error, "error_type": error_type}
            return _body(request_id, "ERROR", payload, error, error_type)
        raise _failure(answer, "result", QueueFailure.RESULT_GONE)
    # A model's error answer is the result: the status said it failed, fal named an error
    # type, or a 422 (a validation error: ``{"detail": [{loc, msg, type}]}``). Any other
    # 4xx or 5xx after a status that said COMPLETED without an error is asked again: a
    # one-off 400 or 408 must not turn a success into an ERROR for good.
    model_error = failed or answer.error_type is not None or answer.status_code == 422
    if not model_error:
        raise _failure(answer, "result", failure)
    return _body(
        request_id,
        "ERROR",
        answer.body,
        error or f"Invalid status code: {answer.status_code}",
        error_type or answer.error_type,
    )


def _body(
    request_id: str,
    status: str,
    payload: Any,
    error: str | None,
    error_type: str | None,
    *,
    raw: bytes | None = None,
) -> RecoveredBody:
    data: dict[str, Any] = {
        "request_id": request_id,
        "gateway_request_id": request_id,
        "status": status,
        "payload": payload,
        "error": error,
        "payload_error": None,
    }
    if error_type is not None:
        data["error_type"] = error_type
    return RecoveredBody(body_with_payload(data, raw), status, error)


def body_with_payload(data: dict[str, Any], raw: bytes | None) -> bytes:
    """`data` (its ``payload`` included) written as fal writes a webhook body: sorted, with
    fal's separators. `raw`, the payload's bytes as fal's queue sent them, is spliced in
    when known: a result of megabytes is not written out again from what was parsed to
    check it (and keeps fal's exact text)."""
    if raw is None:
        return json.dumps(data, sort_keys=True).encode()
    fields = sorted((k, v) for k, v in data.items() if k != "payload")
    before = json.dumps(dict(f for f in fields if f[0] < "payload"))[1:-1].encode()
    after = json.dumps(dict(f for f in fields if f[0] > "payload"))[1:-1].encode()
    return b"{" + b", ".join(p for p in (before, b'"payload": ' + raw, after) if p) + b"}"


def _text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value)
