"""What the dispatcher reports, turned into metrics, memory trims and delivery log lines."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from falhook.receiver.dispatcher import DispatchObserver
from falhook.receiver.durations import format_time
from falhook.receiver.memtrim import MemoryTrimmer
from falhook.receiver.metrics import Metrics
from falhook.receiver.models import Delivery
from falhook.receiver.notify import NoticeKind
from falhook.receiver.store import Claim

__all__ = ["MetricsObserver"]

delivery_log = logging.getLogger("falhook.deliveries")  # one line per delivery outcome


class MetricsObserver(DispatchObserver):
    """The receiver's `DispatchObserver`: counts attempts and outcomes in `metrics`, tells
    `trimmer` when a large body's callbacks are over, and logs each attempt's outcome."""

    def __init__(
        self,
        metrics: Metrics,
        trimmer: MemoryTrimmer,
        notify: Callable[[NoticeKind, str, str | None], None] | None = None,
    ) -> None:
        self.metrics = metrics
        self.trimmer = trimmer
        self.notify = notify

    def started(self, delivery: Delivery) -> None:
        self.metrics.callback_attempts.inc()
        if delivery.attempt == 1:
            self.metrics.dispatch_latency.observe(
                max(0.0, time.time() - delivery.received_at.timestamp())
            )

    def timed_out(self, callback: str) -> None:
        self.metrics.callback_timeouts.labels(callback).inc()

    def called(self, callback: str, seconds: float, outcome: str) -> None:
        self.metrics.called(callback, seconds, outcome)

    def abandoned(self, threads: int) -> None:
        self.metrics.callback_threads_abandoned.set(threads)

    def finished(
        self,
        claim: Claim,
        outcome: str,
        error: str | None,
        *,
        next_attempt_at: float | None = None,
    ) -> None:
        self.metrics.outcome(outcome)
        self.trimmer.finished(len(claim.body))
        if outcome == "dead" and self.notify is not None:
            self.notify(NoticeKind.DELIVERY_DEAD, claim.request_id, error)
        level = logging.INFO if outcome == "done" else logging.WARNING
        if delivery_log.isEnabledFor(level):
            fields: dict[str, Any] = {
                "request_id": claim.request_id,
                "outcome": outcome,
                "attempt": claim.attempt,
                "error": error,
            }
            message = "callbacks %s"
            if next_attempt_at is not None:
                fields["next_attempt_at"] = format_time(next_attempt_at)
                fields["retry_in_seconds"] = round(max(0.0, next_attempt_at - time.time()), 3)
                message += f" (next attempt at {fields['next_attempt_at']})"
            delivery_log.log(level, message, outcome, extra=fields)
