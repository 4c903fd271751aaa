from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from bench import pg, report
from bench.__main__ import build_parser
from bench.runner import (
    ALL_TARGETS,
    FALHOOK_PG,
    FALHOOK_PG2,
    FalhookCli,
    Params,
    default_targets,
    falhook_env,
    run_target,
)

UNREACHABLE = "postgresql+psycopg://postgres@127.0.0.1:1/postgres"


def test_probe_of_an_unreachable_port_is_unavailable_not_an_exception() -> None:
    started = time.monotonic()
    result = pg.probe(UNREACHABLE, timeout_s=1)
    assert time.monotonic() - started < 5
    assert not result.available
    assert result.reason  # e.g. "OperationalError: connection failed: ..."
    assert result.as_dict() == {
        "status": "unavailable",
        "admin_url": UNREACHABLE,
        "reason": result.reason,
    }


def test_probe_of_a_malformed_url_is_unavailable() -> None:
    result = pg.probe("not a url at all", timeout_s=1)
    assert not result.available
    assert "BENCH_PG_URL" in result.reason


def test_urls_for_psycopg_the_run_database_and_the_report() -> None:
    url = "postgresql+psycopg://bench:s3cret@db.example:6543/postgres"
    assert pg.libpq_dsn(url) == "postgresql://bench:s3cret@db.example:6543/postgres"
    assert pg.with_database(url, "falhook_bench_1_ab") == (
        "postgresql+psycopg://bench:s3cret@db.example:6543/falhook_bench_1_ab"
    )
    assert "s3cret" not in pg.redacted(url)
    assert pg.admin_url({}) == pg.DEFAULT_ADMIN_URL
    assert pg.admin_url({pg.ADMIN_URL_ENV: url}) == url


def test_run_database_names_are_unique_plain_identifiers() -> None:
    names = {pg.new_database_name() for _ in range(50)}
    assert len(names) == 50
    for name in names:
        assert name.startswith(pg.DATABASE_PREFIX)
        assert name.replace("_", "").isalnum() and name == name.lower()


def test_postgres_targets_are_default_only_when_postgres_answers() -> None:
    assert default_targets(True) == [t for t in ALL_TARGETS if t != "falhook-tuned"]
    without = default_targets(False)
    assert "falhook" in without
    assert "falhook-pg" not in without and "falhook-pg2" not in without
    assert build_parser().parse_args([]).targets is None  # decided by the probe in main()
    assert build_parser().parse_args(["--targets", "falhook-pg2,falhook"]).targets == [
        "falhook",
        "falhook-pg2",
    ]


@pytest.mark.parametrize("target", [FALHOOK_PG, FALHOOK_PG2])
def test_an_unreachable_postgres_makes_the_target_unavailable(target: Any, tmp_path: Path) -> None:
    probe = pg.PgProbe(False, UNREACHABLE, "OperationalError: connection refused")
    cli = FalhookCli(True)
    result = run_target(target, Params(), tmp_path / "t", lambda _: None, cli, probe)
    assert result == {"status": "unavailable", "reason": "OperationalError: connection refused"}
    assert not (tmp_path / "t").exists()


def test_falhook_env_takes_the_postgres_url() -> None:
    url = "postgresql+psycopg://postgres@127.0.0.1:5432/falhook_bench_1_ab"
    env = falhook_env(Path("/w"), Path("/w/jwks.json"), url)
    assert env["FALHOOK_DATABASE_URL"] == url
    assert falhook_env(Path("/w"), Path("/w/jwks.json"))["FALHOOK_DATABASE_URL"] == (
        "sqlite:////w/falhook.db"
    )


def _pg_results() -> dict[str, dict[str, Any]]:
    return {
        "falhook": {"status": "ok", "rps": 5000.0, "p99_ms": 15.0, "peak_rss_mb": 75.0},
        "falhook-pg": {"status": "ok", "rps": 3000.0, "p99_ms": 30.0, "peak_rss_mb": 80.0},
        "falhook-pg2": {
            "status": "ok",
            "rps": 4500.0,
            "p99_ms": 35.0,
            "peak_rss_mb": 81.5,
            "peak_rss_mb_per_replica": [81.5, 79.25],
        },
    }


def test_postgres_comparisons_are_informational() -> None:
    values = report.headline(_pg_results(), None)
    assert values["pg_vs_sqlite_rps"] == pytest.approx(0.6)
    assert values["pg2_vs_pg_rps"] == pytest.approx(1.5)
    # Not goals: nothing PASSes or FAILs on them.
    goal_keys = {e["key"] for e in report.evaluate(values)}
    assert goal_keys.isdisjoint({"pg_vs_sqlite_rps", "pg2_vs_pg_rps"})
    rows = dict(report.comparison_rows(report.comparisons(values)))
    assert rows["falhook-pg / falhook (SQLite) req/s"] == "0.60x"
    assert rows["falhook-pg2 / falhook-pg req/s"] == "1.50x"


def test_an_invalid_replica_run_is_not_compared() -> None:
    results = _pg_results()
    results["falhook-pg2"]["status"] = "invalid"
    values = report.headline(results, None)
    assert values["pg2_vs_pg_rps"] is None
    rows = dict(report.comparison_rows(report.comparisons(values)))
    assert rows["falhook-pg2 / falhook-pg req/s"] == "—"


def test_replica_rows_show_each_replicas_peak_rss() -> None:
    rows = {r[0]: r for r in report.target_rows(_pg_results())}
    assert list(rows) == ["falhook", "falhook-pg", "falhook-pg2"]
    peak = report.TARGET_HEADER.index("peak RSS MiB")
    assert rows["falhook-pg2"][peak] == "81.5 / 79.2"
    assert rows["falhook-pg"][peak] == "80.0"


def _report(targets: dict[str, dict[str, Any]], postgres: dict[str, Any]) -> dict[str, Any]:
    values = report.headline(targets, None)
    return {
        "date": "2025-01-02T03:04:05+00:00",
        "environment": {
            "nproc": 2, "cpu_model": "cpu", "kernel": "k", "python": "3.11",
            "uvicorn": "u", "starlette": "s", "wrk": "wrk 4",
        },
        "params": {
            "threads": 1, "connections": 32, "duration_s": 10.0, "warmup_s": 2.0,
            "body_bytes": 2048, "uvicorn_flags": ["--loop", "uvloop"],
        },
        "targets": targets,
        "headline": values,
        "goals": report.evaluate(values),
        "comparisons": report.comparisons(values),
        "postgres": postgres,
    }  # fmt: skip


def test_markdown_has_the_comparisons_and_how_the_replicas_ran() -> None:
    md = report.render_markdown(
        _report(_pg_results(), {"status": "ok", "admin_url": "u", "server_version": "15.2"})
    )
    assert "| falhook-pg / falhook (SQLite) req/s | 0.60x |" in md
    assert "| falhook-pg2 / falhook-pg req/s | 1.50x |" in md
    assert "| falhook-pg2 | 4,500 |" in md
    assert "worse of the two wrk runs" in md


def test_markdown_says_why_postgres_targets_did_not_run() -> None:
    targets = {"falhook": _pg_results()["falhook"]}
    postgres = {"status": "unavailable", "admin_url": "u", "reason": "connection refused"}
    md = report.render_markdown(_report(targets, postgres))
    assert "PostgreSQL unavailable: connection refused" in md
    assert "falhook-pg / falhook" not in md
