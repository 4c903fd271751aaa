"""Console charts: per-minute samples from the receiver's own metrics, drawn as SVG."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from falhook.receiver.console.charts import Chart, History, Sampler, charts, p99, svg_chart
from falhook.receiver.metrics import Metrics


def test_a_sample_is_the_minute_since_the_last() -> None:
    metrics = Metrics()
    backlog = {"pending": 3.0}
    sampler = Sampler(metrics, lambda: backlog, clock=lambda: 1000.0)
    for _ in range(5):
        metrics.accepted.inc()
        metrics.ack_latency.observe(0.002)
    metrics.duplicate.inc()
    metrics.rejected("invalid_signature")
    metrics.outcome("done")
    metrics.outcome("retry")
    metrics.outcome("retry")
    first = sampler.sample()
    assert first.counts == {"received": 6, "rejected": 1, "done": 1, "retry": 2, "dead": 0}
    assert first.ack_p99 == 0.002 and first.backlogs == {"pending": 3.0}
    metrics.outcome("dead")
    backlog["pending"] = 0.0
    second = sampler.sample()
    assert second.counts == {"received": 0, "rejected": 0, "done": 0, "retry": 0, "dead": 1}
    assert second.ack_p99 is None  # nothing acknowledged in that minute
    assert [s.counts["dead"] for s in sampler.history.samples] == [0, 1]


def test_history_keeps_a_day() -> None:
    history = History(size=3)
    sampler = Sampler(Metrics(), dict, history)
    for _ in range(5):
        sampler.sample()
    assert len(history.samples) == 3


def test_p99_is_the_bucket_the_99th_percentile_falls_in() -> None:
    bounds = (0.001, 0.01, 0.1, float("inf"))
    assert p99(bounds, [98, 1, 1, 0]) == 0.01
    assert p99(bounds, [100, 0, 0, 0]) == 0.001
    assert p99(bounds, [0, 0, 0, 5]) == 0.1  # beyond the last bound: shown as the last
    assert p99(bounds, [0, 0, 0, 0]) is None


def test_a_chart_is_svg_with_a_line_per_series() -> None:
    chart = Chart("Deliveries <per> minute", "", [("done", "#1e7a34", [1.0, 4.0, None, 2.0])])
    svg = svg_chart(chart, minutes=10)
    root = ET.fromstring(svg)  # well-formed, the title escaped
    ns = "{http://www.w3.org/2000/svg}"
    assert root.find(f"{ns}title").text == "Deliveries <per> minute"  # type: ignore[union-attr]
    # The gap breaks the line: a polyline for the first two minutes, a dot for the last.
    assert len(root.findall(f"{ns}polyline")) == 1 and len(root.findall(f"{ns}circle")) == 1
    assert "done 2" in svg  # the legend shows the latest value


def test_an_empty_history_says_so() -> None:
    svgs = [svg_chart(c) for c in charts(History())]
    assert len(svgs) == 4 and all("no data yet" in svg for svg in svgs)
    for svg in svgs:
        ET.fromstring(svg)
