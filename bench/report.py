"""Pure parts of the report: percentiles, ratios, the targets, markdown and the console table."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench.backlog import DRAIN_DEADLINE_S

TARGET_ORDER = (
    "bare",
    "verify-only",
    "naive",
    "falhook",
    "falhook-def",
    "falhook-tuned",
    "falhook-pg",
    "falhook-pg2",
)
# How each falhook target runs `falhook serve` (the report says so beside the numbers).
CONFIGURATIONS = {
    "falhook": "defaults: log level INFO (JSON lines to the server's log file), "
    "`async def` no-op callback, SQLite",
    "falhook-def": "defaults, with a plain `def` no-op callback",
    "falhook-tuned": "TUNED: `--log-level warning` (no per-delivery lines), `async def` no-op",
    "falhook-pg": "defaults on PostgreSQL, `async def` no-op",
    "falhook-pg2": "defaults, two replicas on one PostgreSQL database",
}


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (the smallest value with at least pct% of values at or below)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= pct <= 100:
        raise ValueError("pct must be within 0..100")
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


@dataclass(frozen=True)
class Goal:
    key: str
    label: str
    op: str  # ">=" or "<="
    threshold: float
    unit: str = ""
    stretch: float | None = None


# Judged on the default configuration, for both callback kinds.
GOALS = (
    Goal("falhook_vs_verify_rps", "falhook / verify-only req/s", ">=", 0.7, "x", stretch=0.8),
    Goal(
        "falhook_def_vs_verify_rps", "falhook-def / verify-only req/s", ">=", 0.7, "x", stretch=0.8
    ),
    Goal("falhook_vs_verify_p99", "falhook p99 / verify-only p99", "<=", 2.0, "x"),
    Goal("falhook_def_vs_verify_p99", "falhook-def p99 / verify-only p99", "<=", 2.0, "x"),
    Goal("dispatch_p50_ms", "dispatch latency p50", "<=", 5.0, "ms"),
    Goal("falhook_peak_rss_mb", "falhook peak RSS", "<=", 150.0, "MiB"),
)


@dataclass(frozen=True)
class Comparison:
    """A ratio reported for information, with no target to pass or fail."""

    key: str
    label: str


COMPARISONS = (
    Comparison("falhook_vs_naive_rps", "falhook / naive req/s"),
    Comparison("tuned_vs_verify_rps", "falhook-tuned / verify-only req/s (tuned)"),
    Comparison("pg_vs_sqlite_rps", "falhook-pg / falhook (SQLite) req/s"),
    Comparison("pg2_vs_pg_rps", "falhook-pg2 / falhook-pg req/s"),
    Comparison("falhook_vs_verify_cpu", "falhook / verify-only CPU per request"),
    Comparison("falhook_def_vs_verify_cpu", "falhook-def / verify-only CPU per request"),
    Comparison("falhook_vs_verify_loop_cpu", "falhook / verify-only event-loop CPU per request"),
)


_MEDIAN_KEYS = (
    "rps", "p50_ms", "p90_ms", "p99_ms", "p999_ms", "mean_ms", "cpu_us", "loop_cpu_us"
)  # fmt: skip


def combine_rounds(rounds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One target's result over interleaved rounds: the median of each latency and rate,
    the highest peak RSS; invalid if any round was. Each round is kept under ``rounds``."""
    if len(rounds) == 1:
        return dict(rounds[0])
    bad = [r for r in rounds if r.get("status") != "ok"]
    if bad:
        worst = dict(bad[0])
        worst["rounds"] = [_round_summary(r) for r in rounds]
        return worst
    # The round with the median rate supplies everything that is not a median.
    by_rate = sorted(rounds, key=lambda r: r["rps"])
    combined = dict(by_rate[(len(by_rate) - 1) // 2])
    for key in _MEDIAN_KEYS:
        values = [r[key] for r in rounds if r.get(key) is not None]
        if values:
            combined[key] = statistics.median(values)
    peaks = [r["peak_rss_mb"] for r in rounds if r.get("peak_rss_mb") is not None]
    combined["peak_rss_mb"] = max(peaks) if peaks else None
    combined["requests"] = sum(r.get("requests", 0) for r in rounds)
    combined["rounds"] = [_round_summary(r) for r in rounds]
    return combined


def _round_summary(r: Mapping[str, Any]) -> dict[str, Any]:
    keys = (
        "status", "rps", "p50_ms", "p99_ms", "peak_rss_mb", "cpu_us", "loop_cpu_us", "problems",
        "reason",
    )  # fmt: skip
    summary = {k: r[k] for k in keys if k in r}
    backlog = r.get("dispatch_backlog")
    if backlog:
        summary["done_at_end"] = backlog.get("done_at_end")
    return summary


def _valid(results: Mapping[str, Mapping[str, Any]], name: str) -> Mapping[str, Any] | None:
    r = results.get(name)
    if r is None or r.get("status") != "ok":
        return None
    return r


def headline(
    results: Mapping[str, Mapping[str, Any]], dispatch: Mapping[str, Any] | None
) -> dict[str, float | None]:
    """The measured values the goals are judged on (None where a target did not run validly)."""
    fal = _valid(results, "falhook")
    fdef = _valid(results, "falhook-def")
    tuned = _valid(results, "falhook-tuned")
    ver = _valid(results, "verify-only")
    nai = _valid(results, "naive")
    pg1 = _valid(results, "falhook-pg")
    pg2 = _valid(results, "falhook-pg2")

    def get(r: Mapping[str, Any] | None, key: str) -> float | None:
        return None if r is None else r.get(key)

    return {
        "falhook_vs_verify_rps": ratio(get(fal, "rps"), get(ver, "rps")),
        "falhook_def_vs_verify_rps": ratio(get(fdef, "rps"), get(ver, "rps")),
        "falhook_vs_naive_rps": ratio(get(fal, "rps"), get(nai, "rps")),
        "falhook_vs_verify_p99": ratio(get(fal, "p99_ms"), get(ver, "p99_ms")),
        "falhook_def_vs_verify_p99": ratio(get(fdef, "p99_ms"), get(ver, "p99_ms")),
        "tuned_vs_verify_rps": ratio(get(tuned, "rps"), get(ver, "rps")),
        "dispatch_p50_ms": None if not dispatch else dispatch.get("p50_ms"),
        "falhook_peak_rss_mb": get(fal, "peak_rss_mb"),
        "verify_vs_naive_rps": ratio(get(ver, "rps"), get(nai, "rps")),
        "pg_vs_sqlite_rps": ratio(get(pg1, "rps"), get(fal, "rps")),
        "pg2_vs_pg_rps": ratio(get(pg2, "rps"), get(pg1, "rps")),
        "falhook_vs_verify_cpu": ratio(get(fal, "cpu_us"), get(ver, "cpu_us")),
        "falhook_def_vs_verify_cpu": ratio(get(fdef, "cpu_us"), get(ver, "cpu_us")),
        "falhook_vs_verify_loop_cpu": ratio(get(fal, "loop_cpu_us"), get(ver, "loop_cpu_us")),
    }


def verdict(goal: Goal, value: float | None) -> str:
    """PASS, FAIL, or N/A when the value could not be measured."""
    if value is None:
        return "N/A"
    ok = value >= goal.threshold if goal.op == ">=" else value <= goal.threshold
    if ok and goal.stretch is not None:
        stretched = value >= goal.stretch if goal.op == ">=" else value <= goal.stretch
        return "PASS (stretch)" if stretched else "PASS"
    return "PASS" if ok else "FAIL"


def evaluate(values: Mapping[str, float | None]) -> list[dict[str, Any]]:
    out = []
    for goal in GOALS:
        value = values.get(goal.key)
        target = f"{goal.op} {goal.threshold:g}{goal.unit}"
        if goal.stretch is not None:
            target += f" (stretch {goal.stretch:g}{goal.unit})"
        out.append(
            {
                "key": goal.key,
                "label": goal.label,
                "value": value,
                "unit": goal.unit,
                "target": target,
                "verdict": verdict(goal, value),
            }
        )
    return out


def ceiling_line(values: Mapping[str, float | None]) -> str | None:
    """verify-only / naive, the most falhook / naive can be on this machine (or None)."""
    value = values.get("verify_vs_naive_rps")
    if value is None:
        return None
    # verify-only does the same check on the same stack and stores nothing: a receiver
    # that also stores cannot beat its ratio to naive, which waits on fsync rather than
    # on the CPU, so the ">= 10x naive" goal depends on the machine's disk/CPU balance.
    return (
        f"verify-only / naive req/s: {value:.2f}x (verify-only stores nothing: the most "
        "falhook / naive can be on this machine)"
    )


def comparisons(values: Mapping[str, float | None]) -> list[dict[str, Any]]:
    return [{"key": c.key, "label": c.label, "value": values.get(c.key)} for c in COMPARISONS]


def comparison_rows(entries: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [
        [e["label"], _fmt(e["value"]) + ("x" if e["value"] is not None else "")] for e in entries
    ]


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def target_rows(results: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    rows = []
    for name in TARGET_ORDER:
        r = results.get(name)
        if r is None:
            continue
        status = r.get("status", "?")
        if r.get("problems"):
            status += ": " + "; ".join(r["problems"])
        elif r.get("reason"):
            status += ": " + r["reason"]
        rows.append(
            [
                name,
                _fmt(r.get("rps"), 0),
                _fmt(r.get("p50_ms")),
                _fmt(r.get("p99_ms")),
                _cpu(r),
                _peak(r),
                _dispatched(r),
                status,
            ]
        )
    return rows


def _cpu(r: Mapping[str, Any]) -> str:
    """CPU per request, all threads (event loop), e.g. ``219 (162)``."""
    if r.get("cpu_us") is None:
        return "—"
    return f"{_fmt(r['cpu_us'], 0)} ({_fmt(r.get('loop_cpu_us'), 0)})"


def _peak(r: Mapping[str, Any]) -> str:
    """Peak RSS; for several replicas each one's, e.g. ``71.0 / 70.2``."""
    per_replica = r.get("peak_rss_mb_per_replica")
    if per_replica:
        return " / ".join(_fmt(p, 1) for p in per_replica)
    return _fmt(r.get("peak_rss_mb"), 1)


def _dispatched(r: Mapping[str, Any]) -> str:
    """For falhook targets: the share of stored deliveries already dispatched when the
    load stopped (the rest were done after it, within the drain deadline, or the run
    is invalid)."""
    done = (r.get("dispatch_backlog") or {}).get("done_at_end")
    return "-" if done is None else f"{done:.0%}"


TARGET_HEADER = [
    "target", "req/s", "p50 ms", "p99 ms", "CPU us/req (loop)", "peak RSS MiB",
    "dispatched at end", "status",
]  # fmt: skip
GOAL_HEADER = ["measure", "value", "target", "verdict"]
COMPARISON_HEADER = ["comparison (informational)", "value"]


def goal_rows(evaluation: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [
        [e["label"], _fmt(e["value"]) + (e["unit"] if e["value"] is not None else ""),
         e["target"], e["verdict"]]
        for e in evaluation
    ]  # fmt: skip


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [
        fmt.format(*r) for r in rows
    ])  # fmt: skip


def render_markdown(report: Mapping[str, Any]) -> str:
    env = report["environment"]
    params = report["params"]
    micro = report.get("verify_micro") or {}
    dispatch = report.get("dispatch") or {}
    dirty = " (with uncommitted changes)" if env.get("git_dirty") else ""
    lines = [
        f"# falhook benchmark — {report['date']}",
        "",
        f"Machine: {env['nproc']} cores, {env['cpu_model']}, kernel {env['kernel']}; "
        f"Python {env['python']}, uvicorn {env['uvicorn']}, starlette {env['starlette']}, "
        f"{env['wrk']}; load average at start {env.get('loadavg_at_start')}; "
        f"commit {env.get('git_commit')}{dirty}.",
        f"wrk: {params['threads']} thread, {params['connections']} connections, "
        f"{params['duration_s']:g} s per target after a {params['warmup_s']:g} s warm-up"
        f"{_rounds_text(params)}; "
        f"unique signed ~{params['body_bytes']} B deliveries. Server: uvicorn "
        f"{' '.join(params['uvicorn_flags'])}. References are Starlette `Route` + "
        "`await request.body()`.",
        "",
        markdown_table(TARGET_HEADER, target_rows(report["targets"])),
        "",
        *configuration_lines(report["targets"]),
        "",
        "dispatched at end: for falhook targets, the share of stored deliveries whose callback "
        "had run when the load stopped; the rest must be done within "
        f"{DRAIN_DEADLINE_S:g} s after it, or the run is invalid (acknowledging fast by "
        "leaving the callbacks for later is not speed).",
        "",
        markdown_table(GOAL_HEADER, goal_rows(report["goals"])),
        "",
        *_ceiling_lines(report),
        *_comparison_lines(report),
        f"verify_signature micro ratio (warm, vs bare nacl floor): "
        f"{_fmt(micro.get('ratio'), 3) if micro.get('status') == 'ok' else micro.get('status')}",
        f"Dispatch latency (ack → callback start): p50 {_fmt(dispatch.get('p50_ms'))} ms, "
        f"p99 {_fmt(dispatch.get('p99_ms'))} ms ({dispatch.get('status', 'not run')}).",
        "",
    ]
    return "\n".join(lines)


def configuration_lines(targets: Mapping[str, Any]) -> list[str]:
    """One line per falhook target that ran: how `falhook serve` was configured."""
    return [f"- {name}: {CONFIGURATIONS[name]}" for name in TARGET_ORDER
            if name in targets and name in CONFIGURATIONS]  # fmt: skip


def _rounds_text(params: Mapping[str, Any]) -> str:
    rounds = params.get("rounds", 1)
    if rounds <= 1:
        return ""
    return (
        f", in {rounds} interleaved rounds (every target once per round, each on a fresh "
        "server and database); the tables show each target's median over its rounds"
    )


def _ceiling_lines(report: Mapping[str, Any]) -> list[str]:
    line = ceiling_line(report.get("headline") or {})
    return [line, ""] if line else []


def _comparison_lines(report: Mapping[str, Any]) -> list[str]:
    """The informational ratios; PostgreSQL details and how the replicas were driven."""
    targets = report["targets"]
    pg = report.get("postgres") or {}
    entries = report.get("comparisons") or comparisons(report.get("headline") or {})
    shown = [e for e in entries if e["value"] is not None or e["key"] == "falhook_vs_naive_rps"]
    lines = [markdown_table(COMPARISON_HEADER, comparison_rows(shown)), ""]
    if not any(name in targets for name in ("falhook-pg", "falhook-pg2")):
        if pg.get("status") == "unavailable":
            lines += [f"falhook-pg, falhook-pg2: not run, PostgreSQL unavailable: "
                      f"{pg.get('reason')} ({pg.get('admin_url')}).", ""]  # fmt: skip
        return lines
    if pg:
        detail = pg.get("server_version") or pg.get("reason") or ""
        lines.append(f"PostgreSQL: {pg.get('status')} ({detail}) at {pg.get('admin_url')}.")
    if "falhook-pg2" in targets:
        lines.append(
            "falhook-pg2: two `falhook serve` replicas on one fresh database, each driven by "
            "its own wrk with half the connections, both at once; req/s is the sum, p50/p99 "
            "the worse of the two wrk runs, peak RSS per replica."
        )
    return [*lines, ""]
