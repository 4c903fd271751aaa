"""Prometheus metrics, one registry per receiver (no process-wide globals)."""

from __future__ import annotations

import logging
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from falhook import __version__
from falhook.receiver.errors import ReceiverError
from falhook.receiver.models import State

__all__ = ["CONTENT_TYPE", "LoopCounter", "LoopHistogram", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
log = logging.getLogger("falhook.metrics")

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
)  # fmt: skip


# Callbacks call databases, APIs and other services: seconds to minutes, not microseconds.
_CALLBACK_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
)  # fmt: skip


class _WithoutCreated:
    """A registry's samples minus the ``*_created`` series.

    prometheus_client adds a ``_created`` timestamp beside every counter and histogram,
    which doubles what is scraped and says nothing an operator acts on. Its own switch,
    ``disable_created_metrics()``, is process-wide (it would change a host application's
    metrics too); this filters only ours, at render time.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Any]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class LoopCounter:
    """A counter only the event loop updates: a plain number, no lock.

    prometheus_client takes a lock for every update (any thread may make one); a
    delivery makes ten on the event loop, which cost about 5% of the loop's instructions
    per delivery (bench/README, "Design figures"). These are read at scrape time.
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class LoopHistogram:
    """A histogram only the event loop updates (see `LoopCounter`)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.bounds = (*buckets, float("inf"))
        self.counts = [0] * len(self.bounds)  # per bucket, not cumulative
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # le: a bound counts as inside
        self.sum += value


class _LoopFamily:
    """One metric of `LoopCounter` or `LoopHistogram` children, by label values."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: tuple[str, ...] = (),
        buckets: tuple[float, ...] | None = None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labels
        self.buckets = buckets
        self.children: dict[tuple[str, ...], Any] = {}

    def labels(self, *values: str) -> Any:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = (
                LoopCounter() if self.buckets is None else LoopHistogram(self.buckets)
            )
        return child

    def collect(self) -> CounterMetricFamily | HistogramMetricFamily:
        labels = list(self.labelnames)
        if self.buckets is None:
            counters = CounterMetricFamily(self.name, self.documentation, labels=labels)
            for values, counter in list(self.children.items()):
                counters.add_metric(list(values), counter.value)
            return counters
        histograms = HistogramMetricFamily(self.name, self.documentation, labels=labels)
        for values, histogram in list(self.children.items()):
            running, cumulative = 0, []
            for bound, count in zip(histogram.bounds, list(histogram.counts), strict=True):
                running += count
                cumulative.append((floatToGoString(bound), running))  # type: ignore[no-untyped-call]
            histograms.add_metric(list(values), cumulative, histogram.sum)
        return histograms


class _LoopCollector(Collector):
    """Renders the `_LoopFamily` metrics at scrape time."""

    def __init__(self, families: list[_LoopFamily]) -> None:
        self._families = families

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        for family in self._families:
            yield family.collect()


class _StoreCollector(Collector):
    """Numbers read from the store (and the key source) at scrape time."""

    def __init__(
        self,
        counts: Callable[[], dict[State, int]],
        oldest_pending_age: Callable[[], float],
        jwks: Callable[[], tuple[int, int]],
    ) -> None:
        self._counts = counts
        self._oldest = oldest_pending_age
        self._jwks = jwks

    def describe(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        # Names only: registering must not query a store that may not be open yet.
        yield CounterMetricFamily("falhook_jwks_fetches", "JWKS fetch attempts")
        yield CounterMetricFamily("falhook_jwks_fetch_failures", "JWKS fetches that failed")
        yield GaugeMetricFamily("falhook_deliveries", "Stored deliveries by state")
        yield GaugeMetricFamily("falhook_oldest_pending_age_seconds", "Oldest pending age")

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        fetches, failures = self._jwks()
        yield CounterMetricFamily("falhook_jwks_fetches", "JWKS fetch attempts", value=fetches)
        yield CounterMetricFamily(
            "falhook_jwks_fetch_failures", "JWKS fetches that failed", value=failures
        )
        try:
            counts = self._counts()
            oldest = self._oldest()
        except ReceiverError as exc:  # store unavailable, or the receiver not started
            log.warning("metrics: store numbers unavailable: %s", exc)
            return
        by_state = GaugeMetricFamily(
            "falhook_deliveries", "Stored deliveries by state", labels=["state"]
        )
        for state, count in counts.items():
            by_state.add_metric([state.value], count)
        yield by_state
        yield GaugeMetricFamily(
            "falhook_oldest_pending_age_seconds",
            "Age of the oldest delivery not yet done or dead",
            value=oldest,
        )


class _ExpectationsCollector(Collector):
    """falhook_expectations{state}, read from the store at scrape time."""

    def __init__(self, counts: Callable[[], Mapping[Any, int]]) -> None:
        self._counts = counts

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("falhook_expectations", "Expectations by state")

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            counts = self._counts()
        except ReceiverError as exc:  # store unavailable, or the receiver not started
            log.warning("metrics: expectation numbers unavailable: %s", exc)
            return
        family = GaugeMetricFamily(
            "falhook_expectations", "Expectations by state", labels=["state"]
        )
        for state, count in counts.items():
            family.add_metric([str(state)], count)
        yield family


class Metrics:
    """The receiver's metrics. Label children used on the hot path are bound once."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Updated for every delivery, on the event loop only: plain numbers (`LoopCounter`).
        loop_families: list[_LoopFamily] = []

        def family(
            name: str, doc: str, labels: tuple[str, ...] = (), buckets: Any = None
        ) -> _LoopFamily:
            loop_families.append(_LoopFamily(name, doc, labels, buckets))
            return loop_families[-1]

        self.received = family(
            "falhook_deliveries_received",
            "Deliveries received, by outcome (accepted, duplicate, rejected) and reason",
            ("outcome", "reason"),
        )
        self.accepted: LoopCounter = self.received.labels("accepted", "")
        self.duplicate: LoopCounter = self.received.labels("duplicate", "")
        self.callback_outcomes = family(
            "falhook_callback_outcomes",
            "Dispatch attempts by outcome (done, retry, dead, fenced, unrecorded)",
            ("outcome",),
        )
        self.callback_calls = family(
            "falhook_callback_calls",
            "Calls of each callback by outcome (ok, error, timeout)",
            ("callback", "outcome"),
        )
        self.callback_duration = family(
            "falhook_callback_duration_seconds",
            "How long each callback ran, by callback",
            ("callback",),
            _CALLBACK_BUCKETS,
        )
        self.callback_attempts: LoopCounter = family(
            "falhook_callback_attempts", "Dispatch attempts started"
        ).labels()
        self.ack_latency: LoopHistogram = family(
            "falhook_ack_latency_seconds",
            "From the request's arrival to its answer being ready. Under falhook serve on "
            "Linux, arrival is when the kernel received the request's latest bytes before the "
            "event loop read them, less 10 ms (a wait for a busy or blocked loop counts); "
            "otherwise it is the loop's first read of the request",
            buckets=_LATENCY_BUCKETS,
        ).labels()
        self.dispatch_latency: LoopHistogram = family(
            "falhook_dispatch_latency_seconds",
            "From a delivery being stored to its first callback attempt starting",
            buckets=_LATENCY_BUCKETS,
        ).labels()
        self.registry.register(_LoopCollector(loop_families))
        Gauge(
            "falhook_build_info",
            "The falhook version running (always 1)",
            ["version"],
            registry=self.registry,
        ).labels(__version__).set(1)
        self.callback_timeouts = Counter(
            "falhook_callback_timeouts",
            "Callbacks that did not return within FALHOOK_CALLBACK_TIMEOUT_SECONDS",
            ["callback"],
            registry=self.registry,
        )
        self.callback_threads_abandoned = Gauge(
            "falhook_callback_threads_abandoned",
            "Sync callbacks past their timeout whose threads are still running",
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "falhook_event_loop_lag_seconds",
            "How late the event loop ran a probe scheduled on it",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.loop_blocked = Counter(
            "falhook_event_loop_blocked",
            "Times the event loop did not respond for over a second, by the callback running",
            ["callback"],
            registry=self.registry,
        )

        self.unknown_paths = Counter(
            "falhook_unknown_path_requests",
            "Requests to a path the receiver does not serve (404), by kind: webhook_path "
            "(looks like a mistyped webhook path: is fal given the wrong URL?) or other",
            ["kind"],
            registry=self.registry,
        )
        self.dispatch_paused = Gauge(
            "falhook_dispatch_paused",
            "1 while dispatch is paused store-wide (no new callbacks start), else 0",
            registry=self.registry,
        )

    def enable_recovery(self, counts: Callable[[], Mapping[Any, int]]) -> None:
        """Recovery from fal's queue is on: count its calls and recoveries, and report
        expectations by state (read from the store at scrape time)."""
        self.queue_requests = Counter(
            "falhook_queue_requests",
            "Calls to fal's queue by outcome (ok, unauthorized, forbidden, not_found, "
            "rate_limited, server_error, rejected, unreachable)",
            ["outcome"],
            registry=self.registry,
        )
        self.recovered = Counter(
            "falhook_recovered",
            "Results recovered from fal's queue (no webhook came, or it had payload_error)",
            registry=self.registry,
        )
        self.registry.register(_ExpectationsCollector(counts))

    def enable_notifications(self) -> None:
        """FALHOOK_NOTIFY_URL is set: count the notifications sent, retried and dropped."""
        self.notifications = Counter(
            "falhook_notifications",
            "Notifications POSTed to FALHOOK_NOTIFY_URL, by kind and outcome (sent, retried, "
            "failed at stop, dropped after retrying until the next batch was due)",
            ["kind", "outcome"],
            registry=self.registry,
        )

    def notification(self, kind: str, outcome: str) -> None:
        self.notifications.labels(kind, outcome).inc()

    def queue_request(self, outcome: str) -> None:
        self.queue_requests.labels(outcome).inc()

    def outcome(self, outcome: str) -> None:
        """Count one dispatch attempt's outcome."""
        self.callback_outcomes.labels(outcome).inc()

    def called(self, callback: str, seconds: float, outcome: str) -> None:
        """Count one callback call and its duration."""
        self.callback_calls.labels(callback, outcome).inc()
        self.callback_duration.labels(callback).observe(seconds)

    def rejected(self, reason: str) -> None:
        self.received.labels("rejected", reason).inc()

    def watch_store(
        self,
        counts: Callable[[], dict[State, int]],
        oldest_pending_age: Callable[[], float],
        jwks: Callable[[], tuple[int, int]],
    ) -> None:
        """Report store and key-source numbers at scrape time."""
        self.registry.register(_StoreCollector(counts, oldest_pending_age, jwks))

    def render(self) -> bytes:
        return generate_latest(_WithoutCreated(self.registry))

    @classmethod
    def reference(cls) -> list[tuple[str, str, tuple[str, ...], str]]:
        """(name as scraped, type, labels, help) of every metric falhook can export, with
        every optional part on: for the generated reference page and its test."""
        metrics = cls()
        metrics.enable_recovery(dict)
        metrics.enable_notifications()
        metrics.watch_store(dict, lambda: 0.0, lambda: (0, 0))
        labels: dict[str, tuple[str, ...]] = {}
        # Label names of metrics that have no child yet are known only to their objects
        # (prometheus_client keeps them private); the rest come from their families.
        for collector, names in list(metrics.registry._collector_to_names.items()):
            for family in getattr(collector, "_families", ()):
                labels[family.name] = tuple(family.labelnames)
            for name in names:
                labels.setdefault(name, tuple(getattr(collector, "_labelnames", ())))
        rows = []
        for family in _WithoutCreated(metrics.registry).collect():
            suffix = "_total" if family.type == "counter" else ""
            found = (
                labels.get(family.name)
                or labels.get(family.name + suffix)
                or tuple(getattr(family, "_labelnames", ()))  # a custom collector's family
            )
            rows.append((family.name + suffix, family.type, found, family.documentation))
        return sorted(rows)
