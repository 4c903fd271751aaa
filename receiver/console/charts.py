"""The console's charts: the last 24 hours, minute by minute, drawn on the server as SVG.

`Sampler` reads the receiver's own cumulative metrics once a minute and keeps the
difference — deliveries received, callback attempts by outcome, the acknowledgement
latency histogram — together with the backlogs read from the store at that moment. Nothing
is added to the hot path (the numbers are the ones /metrics already keeps) and nothing is
written to the store. The history is this process's: it starts empty when the process
does, and on a replica shows that replica's traffic (the backlogs are the whole store's).

`svg_chart` draws one chart as inline SVG: no script, no external asset, as the rest of
the console.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from html import escape

from falhook.receiver.metrics import Metrics

__all__ = ["Chart", "History", "Sample", "Sampler", "svg_chart"]

MINUTES = 24 * 60


@dataclass(frozen=True, slots=True)
class Sample:
    """One minute: what happened in it (counts), and what was waiting at its end."""

    at: float  # the minute's end, epoch seconds
    counts: Mapping[str, float]  # received, done, retry, dead, rejected
    ack_p99: float | None  # seconds; None when nothing was acknowledged that minute
    backlogs: Mapping[str, float]  # pending, recovery, archive


@dataclass
class History:
    """The last `size` samples, oldest first."""

    size: int = MINUTES
    samples: deque[Sample] = field(default_factory=deque)

    def add(self, sample: Sample) -> None:
        self.samples.append(sample)
        while len(self.samples) > self.size:
            self.samples.popleft()


def _children(family: object) -> dict[tuple[str, ...], float]:
    return {labels: child.value for labels, child in getattr(family, "children", {}).items()}


def p99(bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """The 99th percentile of a histogram (per-bucket counts), as the upper bound of the
    bucket it falls in — the same resolution /metrics offers."""
    total = sum(counts)
    if total <= 0:
        return None
    wanted = math.ceil(total * 0.99)
    running = 0
    for bound, count in zip(bounds, counts, strict=True):
        running += count
        if running >= wanted:
            return bound if math.isfinite(bound) else bounds[-2]
    return None


class Sampler:
    """Turns the receiver's cumulative metrics into per-minute samples in a `History`."""

    def __init__(
        self,
        metrics: Metrics,
        backlogs: Callable[[], Mapping[str, float]],
        history: History | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.backlogs = backlogs
        self.history = history or History()
        self.clock = clock
        self._last = self._read()

    def _read(self) -> tuple[dict[str, float], list[int]]:
        received = _children(self.metrics.received)
        outcomes = _children(self.metrics.callback_outcomes)
        counts = {
            "received": sum(v for k, v in received.items() if k[0] in ("accepted", "duplicate")),
            "rejected": sum(v for k, v in received.items() if k[0] == "rejected"),
            "done": outcomes.get(("done",), 0.0),
            "retry": outcomes.get(("retry",), 0.0),
            "dead": outcomes.get(("dead",), 0.0),
        }
        return counts, list(self.metrics.ack_latency.counts)

    def sample(self) -> Sample:
        """Record the minute since the last call (call it once a minute; a thread may, as
        it only reads). The backlogs are read now."""
        counts, histogram = self._read()
        last_counts, last_histogram = self._last
        self._last = (counts, histogram)
        diff = [now - before for now, before in zip(histogram, last_histogram, strict=True)]
        taken = Sample(
            at=self.clock(),
            counts={k: max(0.0, v - last_counts.get(k, 0.0)) for k, v in counts.items()},
            ack_p99=p99(self.metrics.ack_latency.bounds, diff),
            backlogs=dict(self.backlogs()),
        )
        self.history.add(taken)
        return taken


@dataclass(frozen=True, slots=True)
class Chart:
    """One chart's data: named series of values over the same minutes."""

    title: str
    unit: str
    series: Sequence[tuple[str, str, Sequence[float | None]]]  # (name, css colour, values)


def charts(history: History) -> list[Chart]:
    """The console home's four charts, from `history`."""
    samples = list(history.samples)

    def counts(name: str) -> list[float | None]:
        return [s.counts.get(name, 0.0) for s in samples]

    def backlog(name: str) -> list[float | None]:
        return [s.backlogs.get(name) for s in samples]

    p99s = [None if s.ack_p99 is None else s.ack_p99 * 1000 for s in samples]
    return [
        Chart(
            "Deliveries per minute",
            "",
            [
                ("received", "#3b3f99", counts("received")),
                ("done", "#1e7a34", counts("done")),
                ("dead", "#b3261e", counts("dead")),
            ],
        ),
        Chart(
            "Callback failures per minute",
            "",
            [("retried", "#8a5a00", counts("retry")), ("dead", "#b3261e", counts("dead"))],
        ),
        Chart("Acknowledgement p99", "ms", [("p99", "#1f5fbf", p99s)]),
        Chart(
            "Backlogs",
            "",
            [
                ("pending", "#8a5a00", backlog("pending")),
                ("recovery", "#1f5fbf", backlog("recovery")),
                ("archive", "#5c6370", backlog("archive")),
            ],
        ),
    ]


_W, _H, _LEFT, _BOTTOM, _TOP = 360, 120, 40, 18, 8


def _nice(top: float) -> float:
    if top <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(top))
    for step in (1, 2, 5, 10):
        if top <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def _number(value: float) -> str:
    return f"{value:.0f}" if value >= 10 or value == int(value) else f"{value:.1f}"


def svg_chart(chart: Chart, minutes: int = MINUTES) -> str:
    """`chart` as an inline SVG line chart over the last `minutes` (newest at the right).

    Series with no value at all are left out of the legend; a gap (None) breaks a line.
    """
    shown = [
        (n, c, list(v)[-minutes:]) for n, c, v in chart.series if any(x is not None for x in v)
    ]
    values = [x for _, _, v in shown for x in v if x is not None]
    top = _nice(max(values, default=0.0))
    plot_w, plot_h = _W - _LEFT - 4, _H - _BOTTOM - _TOP
    right, base = _W - 4, _TOP + plot_h
    title = escape(chart.title) + (f" ({escape(chart.unit)})" if chart.unit else "")
    parts = [
        f'<svg class="chart" viewBox="0 0 {_W} {_H + 16}" role="img" aria-label="{title}" '
        f'xmlns="http://www.w3.org/2000/svg">',
        f"<title>{title}</title>",
        f'<text x="{_LEFT}" y="{_H + 12}" class="axis">24 h ago</text>',
        f'<text x="{_W - 4}" y="{_H + 12}" class="axis" text-anchor="end">now</text>',
        f'<text x="{_LEFT - 4}" y="{_TOP + 4}" class="axis" text-anchor="end">'
        f"{_number(top)}</text>",
        f'<text x="{_LEFT - 4}" y="{base}" class="axis" text-anchor="end">0</text>',
        f'<line x1="{_LEFT}" y1="{base}" x2="{right}" y2="{base}" class="grid"/>',
        f'<line x1="{_LEFT}" y1="{_TOP}" x2="{right}" y2="{_TOP}" class="grid"/>',
    ]
    for name, colour, series in shown:
        offset = minutes - len(series)  # the history may be shorter than the window
        runs: list[list[str]] = [[]]
        for i, value in enumerate(series):
            if value is None:
                runs.append([])
                continue
            x = _LEFT + plot_w * (offset + i + 0.5) / minutes
            y = _TOP + plot_h * (1 - value / top)
            runs[-1].append(f"{x:.1f},{y:.1f}")
        for run in runs:
            if len(run) == 1:
                cx, cy = run[0].split(",")
                parts.append(f'<circle cx="{cx}" cy="{cy}" r="1.5" fill="{colour}"/>')
            elif run:
                parts.append(
                    f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" '
                    f'points="{" ".join(run)}"><title>{escape(name)}</title></polyline>'
                )
    legend_x = _LEFT
    for name, colour, series in shown:
        latest = next((v for v in reversed(series) if v is not None), None)
        label = escape(name) + ("" if latest is None else f" {_number(latest)}")
        parts.append(
            f'<text x="{legend_x}" y="{_TOP + 10}" class="legend" fill="{colour}">{label}</text>'
        )
        legend_x += 8 + 7 * len(label)
    if not shown:
        parts.append(
            f'<text x="{_LEFT + plot_w / 2}" y="{_TOP + plot_h / 2}" class="axis" '
            f'text-anchor="middle">no data yet</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
