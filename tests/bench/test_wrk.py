from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.wrk import (
    RESULT_MARKER,
    WrkResult,
    combine_parallel,
    lua_script,
    parse_wrk_output,
    split_connections,
    wrk_command,
)


def _line(**overrides: object) -> str:
    raw: dict[str, object] = {
        "requests": 20000,
        "duration_us": 10_000_000,
        "bytes": 1,
        "p50_us": 1500,
        "p90_us": 2000,
        "p99_us": 3000,
        "p999_us": 4000,
        "mean_us": 1600.5,
        "max_us": 9000,
        "errors": {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0},
        "non2xx": 0,
        "counted_non2xx": True,
        "wraps": 0,
        "sent": 20032,
    }
    raw.update(overrides)
    return RESULT_MARKER + json.dumps(raw)


def test_parse_finds_the_json_line_among_wrks_own_output() -> None:
    out = (
        "Running 10s test @ http://127.0.0.1:1/\n  1 threads\n" + _line() + "\nRequests/sec: 2000\n"
    )
    result = parse_wrk_output(out)
    assert result.rps == pytest.approx(2000.0)
    assert (result.p50_ms, result.p99_ms, result.max_ms) == (1.5, 3.0, 9.0)
    assert result.problems == []


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"non2xx": 3}, "non-2xx answers 3"),
        ({"errors": {"connect": 0, "read": 2, "write": 0, "status": 0, "timeout": 0}}, "socket"),
        ({"errors": {"connect": 0, "read": 0, "write": 0, "status": 5, "timeout": 0}}, "non-2xx"),
        ({"errors": {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 1}}, "timeout"),
        ({"requests": 0}, "no requests"),
    ],
)
def test_errors_and_non_2xx_make_a_run_invalid(overrides: dict[str, object], fragment: str) -> None:
    problems = parse_wrk_output(_line(**overrides)).problems
    assert any(fragment in p for p in problems), problems


def test_missing_result_line_is_an_error() -> None:
    with pytest.raises(ValueError, match="no result line"):
        parse_wrk_output("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_lua_script_is_filled_in() -> None:
    script = lua_script("/webhooks/fal", count_non2xx=True)
    assert "__" not in script.replace("__index", "")
    assert '"/webhooks/fal"' in script
    assert "function response(" in script and "function done(" in script
    assert RESULT_MARKER in script
    assert "function response(" not in lua_script(count_non2xx=False)


def test_wrk_command_passes_the_deliveries_file_to_the_script(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("bench.wrk.shutil.which", lambda _: "/usr/bin/wrk")
    url = "http://127.0.0.1:9/webhooks/fal"
    cmd = wrk_command(url, Path("s.lua"), Path("d.tsv"), duration_s=10, connections=32)
    assert cmd[:4] == ["/usr/bin/wrk", "-t1", "-c32", "-d10s"]
    assert cmd[-2:] == ["--", "d.tsv"]


def _result(**overrides: object) -> WrkResult:
    return parse_wrk_output(_line(**overrides))


def test_two_concurrent_runs_add_throughput_and_keep_the_worse_latency() -> None:
    a = _result(requests=30000, p50_us=1000, p90_us=2000, p99_us=5000, max_us=9000)
    b = _result(requests=10000, duration_us=10_100_000, p50_us=3000, p99_us=4000, mean_us=3000.0)
    both = combine_parallel([a, b])
    assert both.rps == pytest.approx(a.rps + b.rps)
    assert both.requests == 40000
    assert both.duration_s == pytest.approx(10.1)
    assert (both.p50_ms, both.p90_ms, both.p99_ms, both.max_ms) == (3.0, 2.0, 5.0, 9.0)
    assert both.mean_ms == pytest.approx((1.6005 * 30000 + 3.0 * 10000) / 40000)
    assert both.problems == []
    assert combine_parallel([a]) == a


def test_a_problem_in_either_run_is_a_problem_of_both() -> None:
    ok = _result()
    bad = _result(
        non2xx=2,
        wraps=1,
        errors={"connect": 0, "read": 1, "write": 0, "status": 0, "timeout": 3},
    )
    both = combine_parallel([ok, bad])
    assert both.wraps == 1 and both.non2xx == 2
    assert (both.errors.read, both.errors.timeout) == (1, 3)
    assert any("socket errors 1, timeouts 3" in p for p in both.problems)
    with pytest.raises(ValueError):
        combine_parallel([])


def test_connections_are_split_between_the_wrk_processes() -> None:
    assert split_connections(32, 2) == [16, 16]
    assert split_connections(33, 2) == [17, 16]
    assert split_connections(32, 1) == [32]
    with pytest.raises(ValueError):
        split_connections(1, 2)
