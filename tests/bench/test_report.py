from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.runner import (
    FALHOOK,
    FALHOOK_DEF,
    FALHOOK_TUNED,
    FalhookCli,
    cpu_model,
    cpu_per_request,
    default_targets,
    main_deliveries,
    write_results,
    wrk_version_line,
)
from bench.servers import cpu_seconds, parse_status_kb


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert report.percentile(values, 50) == 50.0
    assert report.percentile(values, 99) == 99.0
    assert report.percentile(values, 100) == 100.0
    assert report.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        report.percentile([], 50)


def test_ratio_of_missing_values_is_none() -> None:
    assert report.ratio(10.0, 4.0) == 2.5
    assert report.ratio(None, 4.0) is None
    assert report.ratio(1.0, 0.0) is None


def _results(
    falhook: dict[str, Any], falhook_def: dict[str, Any] | None = None
) -> dict[str, dict[str, Any]]:
    results = {
        "bare": {"status": "ok", "rps": 20000.0, "p99_ms": 3.0},
        "verify-only": {"status": "ok", "rps": 8000.0, "p99_ms": 6.0, "peak_rss_mb": 60.0},
        "naive": {"status": "ok", "rps": 500.0, "p99_ms": 80.0},
        "falhook": falhook,
    }
    if falhook_def is not None:
        results["falhook-def"] = falhook_def
    return results


def test_goals_pass_fail_and_stretch_for_both_callback_kinds() -> None:
    falhook = {"status": "ok", "rps": 7500.0, "p99_ms": 15.0, "peak_rss_mb": 90.0}
    falhook_def = {"status": "ok", "rps": 6000.0, "p99_ms": 9.0, "peak_rss_mb": 95.0}
    values = report.headline(_results(falhook, falhook_def), {"status": "ok", "p50_ms": 7.0})
    verdicts = {e["key"]: e["verdict"] for e in report.evaluate(values)}
    assert verdicts == {
        "falhook_vs_verify_rps": "PASS (stretch)",  # 0.94
        "falhook_def_vs_verify_rps": "PASS",  # 0.75
        "falhook_vs_verify_p99": "FAIL",  # 2.5x
        "falhook_def_vs_verify_p99": "PASS",  # 1.5x
        "dispatch_p50_ms": "FAIL",
        "falhook_peak_rss_mb": "PASS",
    }
    assert values["falhook_vs_verify_rps"] == pytest.approx(0.9375)
    # No longer a goal, still reported.
    assert values["falhook_vs_naive_rps"] == pytest.approx(15.0)
    assert "falhook_vs_naive_rps" in {c["key"] for c in report.comparisons(values)}
    assert values["verify_vs_naive_rps"] == pytest.approx(16.0)  # 8000 / 500
    assert "16.00x" in (report.ceiling_line(values) or "")
    assert report.ceiling_line({"verify_vs_naive_rps": None}) is None


def test_an_invalid_or_missing_falhook_is_not_judged() -> None:
    for falhook in ({"status": "unavailable"}, {"status": "invalid", "rps": 1e9}):
        values = report.headline(_results(falhook), None)
        assert {e["verdict"] for e in report.evaluate(values)} == {"N/A"}


def test_tables_render_every_target_and_goal() -> None:
    result = _results({"status": "unavailable", "reason": "no serve"})
    rows = report.target_rows(result)
    assert [r[0] for r in rows] == ["bare", "verify-only", "naive", "falhook"]
    assert rows[-1][-1] == "unavailable: no serve"
    md = report.markdown_table(report.TARGET_HEADER, rows)
    assert md.count("\n") == len(rows) + 1
    text = report.text_table(report.TARGET_HEADER, rows)
    assert "20,000" in text


def test_report_files_are_written(tmp_path: Path) -> None:
    values = report.headline(_results({"status": "unavailable"}), None)
    result = {
        "date": "2025-01-02T03:04:05+00:00",
        "environment": {
            "nproc": 2, "cpu_model": "cpu", "kernel": "k", "python": "3.11",
            "uvicorn": "u", "starlette": "s", "wrk": "wrk 4",
        },
        "params": {
            "threads": 1, "connections": 32, "duration_s": 10.0, "warmup_s": 2.0,
            "body_bytes": 2048, "uvicorn_flags": ["--loop", "uvloop"],
        },
        "targets": _results({"status": "unavailable"}),
        "dispatch": {"status": "unavailable"},
        "verify_micro": {"status": "unavailable", "ratio": None},
        "goals": report.evaluate(values),
        "headline": values,
    }  # fmt: skip
    names = sorted(p.name for p in write_results(result, tmp_path))
    assert names == sorted(
        ["latest.json", "latest.md", "20250102T030405Z.json", "20250102T030405Z.md"]
    )
    markdown = (tmp_path / "latest.md").read_text()
    assert "| bare | 20,000 |" in markdown
    assert "verify-only / naive req/s: 16.00x" in markdown
    assert "- falhook: defaults: log level INFO" in markdown
    assert "| falhook / naive req/s | — |" in markdown
    assert not list(tmp_path.glob("*.tmp"))


def test_main_run_gets_enough_unique_deliveries() -> None:
    assert main_deliveries(20000.0, 10.0) >= 500_000
    assert main_deliveries(3700.0, 10.0) > 6300 * 10  # a slow warm-up, a fast run
    assert main_deliveries(0.0, 10.0) == 5000
    assert main_deliveries(1e9, 10.0) == 800_000


def test_vmhwm_is_read_from_proc_status() -> None:
    text = "Name:\tpython\nVmPeak:\t  300000 kB\nVmHWM:\t   61440 kB\nVmRSS:\t 50000 kB\n"
    assert parse_status_kb(text, "VmHWM") == 61440
    assert parse_status_kb(text, "VmSwap") is None


def test_cpu_seconds_count_a_busy_childs_threads_and_its_main_thread_apart() -> None:
    # A real process: its main thread spins, then a second thread spins as long again.
    code = (
        "import sys, threading, time\n"
        "def spin(s):\n"
        "    end = time.thread_time() + s\n"
        "    while time.thread_time() < end: pass\n"
        "spin(0.3)\n"
        "t = threading.Thread(target=spin, args=(0.3,)); t.start(); t.join()\n"
        "print('done', flush=True); sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"done\n"
        total, main = cpu_seconds(proc.pid)
    finally:
        proc.communicate(b"")
    assert 0.28 <= main < 0.6  # the main thread's spin, plus start-up
    assert total >= main + 0.28  # the second thread counts in the total only


def test_cpu_per_request_sums_replicas_and_divides_by_answers() -> None:
    before = [(1.0, 0.5), (2.0, 1.0)]
    after = [(1.2, 0.6), (2.3, 1.2)]
    values = cpu_per_request(before, after, 1000)
    assert values["cpu_us"] == pytest.approx(500.0)  # (0.2 + 0.3) s / 1000
    assert values["loop_cpu_us"] == pytest.approx(300.0)  # (0.1 + 0.2) s / 1000
    assert cpu_per_request(before, after, 0) == {"cpu_us": None, "loop_cpu_us": None}


def test_cpu_per_request_is_reported_and_compared_with_verify_only() -> None:
    results = _results({"status": "ok", "rps": 4000.0, "cpu_us": 220.0, "loop_cpu_us": 160.0})
    results["verify-only"].update(cpu_us=90.0, loop_cpu_us=88.0)
    values = report.headline(results, None)
    assert values["falhook_vs_verify_cpu"] == pytest.approx(220 / 90)
    assert values["falhook_vs_verify_loop_cpu"] == pytest.approx(160 / 88)
    assert values["falhook_def_vs_verify_cpu"] is None  # falhook-def did not run
    # Informational: nothing passes or fails on CPU.
    assert "falhook_vs_verify_cpu" not in {e["key"] for e in report.evaluate(values)}
    compared = dict(report.comparison_rows(report.comparisons(values)))
    assert compared["falhook / verify-only CPU per request"] == "2.44x"
    column = report.TARGET_HEADER.index("CPU us/req (loop)")
    rows = {r[0]: r for r in report.target_rows(results)}
    assert rows["falhook"][column] == "220 (160)"
    assert rows["naive"][column] == "—"  # not measured


def test_machine_description_helpers() -> None:
    line = "wrk debian/4.1.0-3+b2 [epoll] Copyright (C) 2012 Will Glozer"
    assert wrk_version_line(line) == "wrk debian/4.1.0-3+b2 [epoll]"
    cpuinfo = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Processor\n"
    assert cpu_model(cpuinfo) == "Intel(R) Xeon(R) Processor"
    assert cpu_model("") == "unknown"


def test_rounds_are_combined_by_median_with_the_highest_peak() -> None:
    rounds = [
        {"status": "ok", "rps": 100.0, "p50_ms": 3.0, "p99_ms": 9.0, "peak_rss_mb": 70.0,
         "cpu_us": 250.0},
        {"status": "ok", "rps": 300.0, "p50_ms": 1.0, "p99_ms": 30.0, "peak_rss_mb": 75.0,
         "cpu_us": 200.0},
        {"status": "ok", "rps": 200.0, "p50_ms": 2.0, "p99_ms": 10.0, "peak_rss_mb": 72.0,
         "cpu_us": 210.0},
    ]  # fmt: skip
    combined = report.combine_rounds(rounds)
    assert combined["status"] == "ok"
    assert (combined["rps"], combined["p50_ms"], combined["p99_ms"]) == (200.0, 2.0, 10.0)
    assert combined["cpu_us"] == 210.0
    assert combined["peak_rss_mb"] == 75.0
    assert [r["rps"] for r in combined["rounds"]] == [100.0, 300.0, 200.0]


def test_one_invalid_round_makes_the_target_invalid() -> None:
    rounds = [
        {"status": "ok", "rps": 100.0},
        {"status": "invalid", "rps": 5.0, "problems": ["12 non-2xx answers"]},
    ]
    combined = report.combine_rounds(rounds)
    assert combined["status"] == "invalid"
    assert combined["problems"] == ["12 non-2xx answers"]
    assert len(combined["rounds"]) == 2


def test_a_single_round_is_reported_as_it_ran() -> None:
    only = {"status": "ok", "rps": 123.0, "p99_ms": 4.0}
    assert report.combine_rounds([only]) == only


def test_deliveries_go_to_ram_when_there_is_some(tmp_path: Path) -> None:
    from bench.runner import SHM, deliveries_dir

    with deliveries_dir(tmp_path) as data:
        if SHM.is_dir():
            assert data.parent == SHM and data.is_dir()
        else:
            assert data == tmp_path
        (data / "main.tsv").write_bytes(b"x")
    if SHM.is_dir():
        assert not data.exists()  # removed with the target


def test_falhook_targets_run_serve_defaults_unless_tuned() -> None:
    cli = FalhookCli(True, help_text="--log-level VALUE --callback")
    default = cli.command(8000, FALHOOK.callback, FALHOOK.log_level)
    assert "--log-level" not in default  # serve's default: INFO, one line a delivery
    assert default[default.index("--callback") + 1] == "bench.callbacks:noop"
    sync = cli.command(8000, FALHOOK_DEF.callback, FALHOOK_DEF.log_level)
    assert sync[sync.index("--callback") + 1] == "bench.callbacks:noop_def"
    assert "--log-level" not in sync
    tuned = cli.command(8000, FALHOOK_TUNED.callback, FALHOOK_TUNED.log_level)
    assert tuned[-2:] == ["--log-level", "warning"]
    assert "falhook-tuned" not in default_targets(True)
    assert {"falhook", "falhook-def"} <= set(default_targets(False))
    assert "TUNED" in report.CONFIGURATIONS["falhook-tuned"]


def test_the_def_noop_callback_is_a_plain_function() -> None:
    import inspect

    from bench import callbacks

    assert not inspect.iscoroutinefunction(callbacks.noop_def)
    assert inspect.iscoroutinefunction(callbacks.noop)
    callbacks.noop_def(object())
