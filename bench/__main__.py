"""``python -m bench``: the receiver's speed, measured side by side (see bench/README.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bench import report
from bench.pg import probe
from bench.runner import (
    ALL_TARGETS,
    PG_TARGETS,
    TUNED_TARGETS,
    Params,
    default_targets,
    run,
    write_results,
)

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parse_targets(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in ALL_TARGETS]
    if unknown or not names:
        choices = ",".join(ALL_TARGETS)
        raise argparse.ArgumentTypeError(
            f"unknown target(s) {', '.join(unknown) or '(none)'}; choose from {choices}"
        )
    # Keep the report's order whatever order they were named in.
    return [n for n in ALL_TARGETS if n in names]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="~3 s per target smoke run")
    p.add_argument(
        "--targets",
        type=parse_targets,
        default=None,
        help=f"{','.join(ALL_TARGETS)} (default: all but {','.join(TUNED_TARGETS)}; "
        f"{','.join(PG_TARGETS)} only when PostgreSQL at BENCH_PG_URL answers)",
    )
    p.add_argument(
        "--duration", type=float, help="seconds per target and round (default 6, quick 3)"
    )
    p.add_argument("--warmup", type=float, help="warm-up seconds (default 2, quick 1)")
    p.add_argument(
        "--rounds",
        type=int,
        help="interleaved rounds; each target's median is reported (default 3, quick 1)",
    )
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument("--dispatch-count", type=int, help="dispatch deliveries (500, quick 100)")
    p.add_argument("--dispatch-rate", type=float, default=50.0, help="dispatch deliveries/s")
    p.add_argument("--no-micro", action="store_true", help="skip the verify_signature micro")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--no-write", action="store_true", help="print only; write no results")
    return p


def params_from(args: argparse.Namespace) -> Params:
    quick = bool(args.quick)
    return Params(
        duration_s=args.duration or (3.0 if quick else 6.0),
        warmup_s=args.warmup or (1.0 if quick else 2.0),
        connections=args.connections,
        threads=args.threads,
        dispatch_count=args.dispatch_count or (100 if quick else 500),
        dispatch_rate=args.dispatch_rate,
        micro=not args.no_micro,
        rounds=max(1, args.rounds or (1 if quick else 3)),
    )


def log(message: str) -> None:
    print(message, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    targets = args.targets
    pg = None
    if targets is None:
        pg = probe()
        targets = default_targets(pg.available)
        if not pg.available:
            log(f"{', '.join(PG_TARGETS)}: not run, PostgreSQL unavailable: {pg.reason}")
    result = run(targets, params_from(args), log, pg)
    print()
    print(report.text_table(report.TARGET_HEADER, report.target_rows(result["targets"])))
    print()
    print(report.text_table(report.GOAL_HEADER, report.goal_rows(result["goals"])))
    ceiling = report.ceiling_line(result["headline"])
    if ceiling:
        print(ceiling)
    print()
    print("\n".join(report.configuration_lines(result["targets"])))
    shown = [c for c in result["comparisons"] if c["value"] is not None]
    if shown:
        print()
        print(report.text_table(report.COMPARISON_HEADER, report.comparison_rows(shown)))
    if not any(name in result["targets"] for name in PG_TARGETS) and (
        result["postgres"].get("status") == "unavailable"
    ):
        print(f"\nPostgreSQL targets not run: unavailable: {result['postgres'].get('reason')}")
    micro = result["verify_micro"]
    dispatch = result["dispatch"]
    print()
    print(f"verify_signature micro ratio: {micro.get('ratio')} ({micro['status']})")
    print(
        f"dispatch latency: p50 {dispatch.get('p50_ms')} ms, p99 {dispatch.get('p99_ms')} ms "
        f"({dispatch['status']})"
    )
    if not args.no_write:
        for path in write_results(result, args.results_dir):
            print(f"wrote {path}")
    failed = [n for n, r in result["targets"].items() if r["status"] in ("error", "invalid")]
    if failed:
        print(f"targets without a valid result: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
