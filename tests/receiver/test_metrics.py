"""Prometheus metrics: one registry per receiver, numbers that follow what happened."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from falhook.receiver.errors import StoreUnavailableError
from falhook.receiver.metrics import Metrics
from falhook.receiver.models import State


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counters_histograms_and_store_numbers() -> None:
    metrics = Metrics()
    counts = dict.fromkeys(State, 0) | {State.PENDING: 3, State.DEAD: 1}
    metrics.watch_store(lambda: counts, lambda: 42.5, lambda: (7, 2))
    metrics.accepted.inc()
    metrics.duplicate.inc()
    metrics.rejected("invalid_signature")
    metrics.rejected("invalid_signature")
    metrics.outcome("dead")
    metrics.outcome("done")
    metrics.outcome("done")  # the cached child of the first call
    metrics.ack_latency.observe(0.003)
    samples = _samples(metrics)
    received = "falhook_deliveries_received_total"
    assert samples[(received, (("outcome", "accepted"), ("reason", "")))] == 1
    assert samples[(received, (("outcome", "duplicate"), ("reason", "")))] == 1
    assert samples[(received, (("outcome", "rejected"), ("reason", "invalid_signature")))] == 2
    assert samples[("falhook_callback_outcomes_total", (("outcome", "dead"),))] == 1
    assert samples[("falhook_callback_outcomes_total", (("outcome", "done"),))] == 2
    assert samples[("falhook_ack_latency_seconds_count", ())] == 1
    assert samples[("falhook_deliveries", (("state", "pending"),))] == 3
    assert samples[("falhook_deliveries", (("state", "dead"),))] == 1
    assert samples[("falhook_oldest_pending_age_seconds", ())] == 42.5
    assert samples[("falhook_jwks_fetches_total", ())] == 7
    assert samples[("falhook_jwks_fetch_failures_total", ())] == 2


def test_receivers_do_not_share_metrics() -> None:
    first, second = Metrics(), Metrics()
    first.accepted.inc()
    assert ("falhook_deliveries_received_total", (("outcome", "accepted"), ("reason", ""))) in (
        _samples(first)
    )
    assert (
        _samples(second).get(
            ("falhook_deliveries_received_total", (("outcome", "accepted"), ("reason", "")))
        )
        == 0
    )


def test_store_outage_leaves_out_store_numbers_only() -> None:
    def down() -> dict[State, int]:
        raise StoreUnavailableError("down")

    metrics = Metrics()
    metrics.watch_store(down, lambda: 0.0, lambda: (1, 0))
    samples = _samples(metrics)
    assert samples[("falhook_jwks_fetches_total", ())] == 1
    assert not any(name == "falhook_deliveries" for name, _ in samples)


def test_build_info_callback_calls_and_durations_and_no_created_series() -> None:
    import falhook

    metrics = Metrics()
    metrics.called("app:save", 0.3, "ok")
    metrics.called("app:save", 0.1, "ok")
    metrics.called("app:save", 2.0, "error")
    metrics.called("app:notify", 0.01, "timeout")
    samples = _samples(metrics)
    assert samples[("falhook_build_info", (("version", falhook.__version__),))] == 1
    calls = "falhook_callback_calls_total"
    assert samples[(calls, (("callback", "app:save"), ("outcome", "ok")))] == 2
    assert samples[(calls, (("callback", "app:save"), ("outcome", "error")))] == 1
    assert samples[(calls, (("callback", "app:notify"), ("outcome", "timeout")))] == 1
    duration = "falhook_callback_duration_seconds"
    assert samples[(duration + "_count", (("callback", "app:save"),))] == 3
    assert abs(samples[(duration + "_sum", (("callback", "app:save"),))] - 2.4) < 1e-9
    text = metrics.render().decode()
    assert "_created" not in text


def test_loop_histograms_count_a_value_on_a_bound_inside_it_and_are_cumulative() -> None:
    metrics = Metrics()
    for seconds in (0.0005, 0.0005001, 0.003, 99.0):
        metrics.ack_latency.observe(seconds)
    samples = _samples(metrics)
    bucket = "falhook_ack_latency_seconds_bucket"
    assert samples[(bucket, (("le", "0.0005"),))] == 1  # le: the bound itself is inside
    assert samples[(bucket, (("le", "0.001"),))] == 2
    assert samples[(bucket, (("le", "0.005"),))] == 3
    assert samples[(bucket, (("le", "60.0"),))] == 3
    assert samples[(bucket, (("le", "+Inf"),))] == 4
    assert samples[("falhook_ack_latency_seconds_count", ())] == 4
    assert abs(samples[("falhook_ack_latency_seconds_sum", ())] - 99.0040001) < 1e-9
