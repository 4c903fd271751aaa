"""One benchmark run: each target under wrk, the dispatch phase, the micro ratio, the report."""

from __future__ import annotations

import importlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx

from bench import backlog, report
from bench.fixtures import TARGET_BODY_BYTES, new_signing_key, read_deliveries, write_deliveries
from bench.fixtures import write_jwks as write_jwks_file
from bench.pg import PgProbe, fresh_database, redacted
from bench.pg import probe as probe_pg
from bench.servers import REPO_ROOT, UVICORN_FLAGS, VENV_BIN, Server, free_port, uvicorn_command
from bench.wrk import (
    WrkResult,
    combine_parallel,
    lua_script,
    run_wrk_parallel,
    split_connections,
    wrk_binary,
)

WEBHOOK_PATH = "/webhooks/fal"
# Warm-up deliveries per second of warm-up: more than any target here answers (bare ~21k/s).
WARMUP_RATE_CAP = 30_000
SHM = Path("/dev/shm")
MAX_DELIVERIES = 800_000

Log = Callable[[str], None]


@dataclass(frozen=True)
class Params:
    duration_s: float = 10.0
    warmup_s: float = 2.0
    connections: int = 32
    threads: int = 1
    dispatch_count: int = 500
    dispatch_rate: float = 50.0
    micro: bool = True
    rounds: int = 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "duration_s": self.duration_s,
            "warmup_s": self.warmup_s,
            "connections": self.connections,
            "threads": self.threads,
            "dispatch_count": self.dispatch_count,
            "dispatch_rate": self.dispatch_rate,
            "rounds": self.rounds,
            "body_bytes": TARGET_BODY_BYTES,
            "uvicorn_flags": list(UVICORN_FLAGS),
        }


@dataclass(frozen=True)
class Target:
    name: str
    dedupes: bool  # repeated request ids would take a different path (duplicate answers)
    factory: str | None = None  # uvicorn factory for the references
    postgres: bool = False  # falhook on a fresh PostgreSQL database instead of SQLite
    replicas: int = 1  # falhook serve processes sharing that database, one wrk each
    callback: str = "bench.callbacks:noop"  # falhook: an `async def` no-op
    log_level: str | None = None  # falhook: None = serve's default (INFO, one line a delivery)


REFERENCES = {
    "bare": Target("bare", dedupes=False, factory="bench.targets:bare_app"),
    "verify-only": Target("verify-only", dedupes=False, factory="bench.targets:verify_only_app"),
    "naive": Target("naive", dedupes=True, factory="bench.targets:naive_app"),
}
# falhook as users run it: serve's defaults (INFO logs, here into the server's log file).
FALHOOK = Target("falhook", dedupes=True)
FALHOOK_DEF = Target("falhook-def", dedupes=True, callback="bench.callbacks:noop_def")
# A tuned configuration, reported as such and only when named: per-delivery logs off.
FALHOOK_TUNED = Target("falhook-tuned", dedupes=True, log_level="warning")
FALHOOK_PG = Target("falhook-pg", dedupes=True, postgres=True)
FALHOOK_PG2 = Target("falhook-pg2", dedupes=True, postgres=True, replicas=2)
FALHOOKS = {t.name: t for t in (FALHOOK, FALHOOK_DEF, FALHOOK_TUNED, FALHOOK_PG, FALHOOK_PG2)}
PG_TARGETS = (FALHOOK_PG.name, FALHOOK_PG2.name)
TUNED_TARGETS = (FALHOOK_TUNED.name,)
ALL_TARGETS = (*REFERENCES, *FALHOOKS)


def default_targets(pg_available: bool) -> list[str]:
    """Every default-configuration target; PostgreSQL ones only when PostgreSQL answered."""
    return [
        n for n in ALL_TARGETS if n not in TUNED_TARGETS and (pg_available or n not in PG_TARGETS)
    ]


def main_deliveries(estimated_rps: float, duration_s: float) -> int:
    """How many unique deliveries the measured run needs: 2.5x the warm-up rate, plus slack.

    A falhook warm-up starts on an empty database and has run ~40% slower than the
    measured run after it (seen: 3.7k warm-up, 6.3k measured, and 1.5x ran out)."""
    wanted = math.ceil(max(estimated_rps, 0.0) * duration_s * 2.5) + 2000
    return max(5000, min(MAX_DELIVERIES, wanted))


# ---------------------------------------------------------------- falhook serve


@dataclass(frozen=True)
class FalhookCli:
    available: bool
    reason: str = ""
    help_text: str = ""

    def command(self, port: int, callback: str, log_level: str | None = None) -> list[str]:
        """`falhook serve` with its defaults; ``log_level`` given only for a tuned target."""
        cmd = [
            str(VENV_BIN / "falhook"),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--callback",
            callback,
        ]
        if log_level is not None and "--log-level" in self.help_text:
            cmd += ["--log-level", log_level]
        if "--no-access-log" in self.help_text:  # the references' flag, where serve has it
            cmd.append("--no-access-log")
        return cmd


def probe_falhook() -> FalhookCli:
    exe = VENV_BIN / "falhook"
    if not exe.exists():
        return FalhookCli(False, f"{exe} not installed")
    try:
        proc = subprocess.run(
            [str(exe), "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO_ROOT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return FalhookCli(False, "`falhook serve --help` timed out")
    if proc.returncode != 0:
        last = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-1:] or [""]
        return FalhookCli(False, f"`falhook serve --help` exited {proc.returncode}: {last[0]}")
    return FalhookCli(True, help_text=proc.stdout)


def falhook_env(workdir: Path, jwks: Path, database_url: str | None = None) -> dict[str, str]:
    return {
        "FALHOOK_DATABASE_URL": database_url or f"sqlite:///{workdir / 'falhook.db'}",
        "FALHOOK_JWKS_URL": str(jwks),
    }


# ---------------------------------------------------------------- one target under wrk


def run_target(
    target: Target,
    params: Params,
    workdir: Path,
    log: Log,
    falhook: FalhookCli,
    pg: PgProbe | None = None,
) -> dict[str, Any]:
    if target.factory is None and not falhook.available:
        return {"status": "unavailable", "reason": falhook.reason}
    if target.postgres and (pg is None or not pg.available):
        return {"status": "unavailable", "reason": pg.reason if pg else "PostgreSQL not probed"}
    workdir.mkdir(parents=True)
    with deliveries_dir(workdir) as data:
        return _run_target(target, params, workdir, data, log, falhook, pg)


@contextmanager
def deliveries_dir(workdir: Path) -> Iterator[Path]:
    """Where the signed deliveries go: RAM (``/dev/shm``) when there is one.

    They are test data, up to ~1 GB for the bare target: written to the disk under test,
    the kernel flushed them in the background while later targets ran, and those targets'
    fsyncs (falhook's commits, naive's) could queue behind that writeback. The databases
    stay in ``workdir``, on the disk.
    """
    if SHM.is_dir() and os.access(SHM, os.W_OK):
        path = Path(tempfile.mkdtemp(prefix="falhook-bench-", dir=SHM))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)
    else:
        yield workdir


def _run_target(
    target: Target,
    params: Params,
    workdir: Path,
    data: Path,
    log: Log,
    falhook: FalhookCli,
    pg: PgProbe | None,
) -> dict[str, Any]:
    key = new_signing_key()
    jwks = write_jwks_file(key, workdir / "jwks.json")
    script = workdir / "deliveries.lua"
    script.write_text(lua_script(WEBHOOK_PATH, count_non2xx=True))
    n = target.replicas
    # One file name per replica; a single server keeps the plain names.
    suffixes = [""] if n == 1 else [str(i + 1) for i in range(n)]
    servers: list[Server] = []
    result: dict[str, Any] = {}
    try:
        with ExitStack() as stack:
            if target.factory is not None:
                port = free_port()
                command = uvicorn_command(target.factory, port)
                env = {"BENCH_JWKS_FILE": str(jwks), "BENCH_DB_PATH": str(workdir / "naive.db")}
                servers.append(Server(target.name, command, port, env, workdir / "server.log"))
            else:
                database_url = None
                if target.postgres:
                    assert pg is not None
                    database_url = stack.enter_context(fresh_database(pg.admin_url))
                    result["database_url"] = redacted(database_url)
                env = falhook_env(workdir, jwks, database_url)
                for suffix in suffixes:
                    port = free_port()
                    command = falhook.command(port, target.callback, target.log_level)
                    name = target.name + (f"-{suffix}" if suffix else "")
                    log_path = workdir / f"server{suffix}.log"
                    servers.append(Server(name, command, port, env, log_path))
            result["command"] = " ".join(servers[0].command)
            if n > 1:
                result["commands"] = [" ".join(s.command) for s in servers]
            warm_files = [
                write_deliveries(
                    key,
                    max(1000, int(params.warmup_s * WARMUP_RATE_CAP / n)),
                    data / f"warmup{suffix}.tsv",
                )
                for suffix in suffixes
            ]
            for server in servers:  # started one after the other; each must answer first
                stack.enter_context(server)
            urls = [server.base_url + WEBHOOK_PATH for server in servers]
            warm_runs = run_wrk_parallel(
                list(zip(urls, warm_files, strict=True)),
                script,
                duration_s=params.warmup_s,
                connections=params.connections,
                threads=params.threads,
            )
            warm_result = combine_parallel([r for r, _ in warm_runs])
            counts = [main_deliveries(r.rps, params.duration_s) for r, _ in warm_runs]
            count = sum(counts)
            log(f"  warm-up {warm_result.rps:,.0f} req/s; signing {count:,} fresh deliveries")
            main_files = [
                write_deliveries(key, c, data / f"main{suffix}.tsv")
                for c, suffix in zip(counts, suffixes, strict=True)
            ]
            cpu_before = [server.cpu_seconds() for server in servers]
            runs = run_wrk_parallel(
                list(zip(urls, main_files, strict=True)),
                script,
                duration_s=params.duration_s,
                connections=params.connections,
                threads=params.threads,
            )
            cpu_after = [server.cpu_seconds() for server in servers]
            peaks = [server.peak_rss_mb() for server in servers]
            if target.factory is None:  # a falhook target: did dispatch keep up?
                result["dispatch_backlog"] = backlog.measure(env["FALHOOK_DATABASE_URL"])
                log("  " + backlog.summary(result["dispatch_backlog"]))
        for (_, text), suffix in zip(runs, suffixes, strict=True):
            (workdir / f"wrk{suffix}.txt").write_text(text)
    except Exception as exc:
        return {
            **result,
            "status": "error",
            "reason": f"{type(exc).__name__}: {exc}",
            "server_log": "\n".join(s.log_tail() for s in servers),
        }
    measured = combine_parallel([r for r, _ in runs])
    problems = measured.problems
    if warm_result.problems:
        problems = [f"warm-up: {p}" for p in warm_result.problems] + problems
    problems += backlog.problems(result.get("dispatch_backlog", {}))
    if measured.wraps and target.dedupes:
        problems.append(f"ran out of unique deliveries ({count:,}); repeats were duplicates")
    known_peaks = [p for p in peaks if p is not None]
    result.update(
        {
            "status": "invalid" if problems else "ok",
            "problems": problems,
            "rps": measured.rps,
            "p50_ms": measured.p50_ms,
            "p90_ms": measured.p90_ms,
            "p99_ms": measured.p99_ms,
            "p999_ms": measured.p999_ms,
            "mean_ms": measured.mean_ms,
            "max_ms": measured.max_ms,
            "requests": measured.requests,
            "duration_s": measured.duration_s,
            "errors": measured.as_dict()["errors"],
            "non2xx": measured.non2xx,
            "unique_deliveries": count,
            "wraps": measured.wraps,
            "warmup_rps": warm_result.rps,
            # One server: its peak. Several replicas: the highest of them (each in the list).
            "peak_rss_mb": max(known_peaks) if known_peaks else None,
            **cpu_per_request(cpu_before, cpu_after, measured.requests),
        }
    )
    if problems:  # why the servers answered as they did
        result["server_log"] = "\n".join(s.log_tail() for s in servers)
    if n > 1:
        result["latency_is"] = "worst of the replicas' wrk runs (p50/p90/p99/p99.9/max)"
        result["peak_rss_mb_per_replica"] = peaks
        result["replicas"] = [
            replica_dict(r, share, peak, c, w.rps)
            for (r, _), share, peak, c, (w, _) in zip(
                runs,
                split_connections(params.connections, n),
                peaks,
                counts,
                warm_runs,
                strict=True,
            )
        ]
    return result


def cpu_per_request(
    before: list[tuple[float, float]], after: list[tuple[float, float]], requests: int
) -> dict[str, float | None]:
    """The servers' CPU time per answered request over the measured run, in µs: all their
    threads (``cpu_us``), and their main threads (``loop_cpu_us``: uvicorn's event loop),
    summed over replicas. wrk's own start-up (reading its deliveries) falls inside the
    window, while the servers wait, so it adds only what an idle server spends."""
    if requests <= 0:
        return {"cpu_us": None, "loop_cpu_us": None}
    total = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    main = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    return {"cpu_us": total / requests * 1e6, "loop_cpu_us": main / requests * 1e6}


def replica_dict(
    measured: WrkResult, connections: int, peak_rss_mb: float | None, count: int, warm_rps: float
) -> dict[str, Any]:
    """One replica's own wrk run, kept beside the combined figures."""
    return {
        "connections": connections,
        "rps": measured.rps,
        "p50_ms": measured.p50_ms,
        "p90_ms": measured.p90_ms,
        "p99_ms": measured.p99_ms,
        "max_ms": measured.max_ms,
        "requests": measured.requests,
        "problems": measured.problems,
        "peak_rss_mb": peak_rss_mb,
        "unique_deliveries": count,
        "warmup_rps": warm_rps,
    }


# ---------------------------------------------------------------- dispatch latency


def read_latencies_ms(path: Path) -> list[float]:
    if not path.exists():
        return []
    return [float(line) * 1000 for line in path.read_text().split()]


def run_dispatch(params: Params, workdir: Path, log: Log, falhook: FalhookCli) -> dict[str, Any]:
    """Deliveries at a moderate fixed rate to falhook with the ``record`` callback."""
    if not falhook.available:
        return {"status": "unavailable", "reason": falhook.reason}
    workdir.mkdir(parents=True)
    key = new_signing_key()
    jwks = write_jwks_file(key, workdir / "jwks.json")
    latency_file = workdir / "latency.txt"
    port = free_port()
    command = falhook.command(port, "bench.callbacks:record")
    env = {**falhook_env(workdir, jwks), "FALHOOK_BENCH_LATENCY_FILE": str(latency_file)}
    server = Server("falhook-dispatch", command, port, env, workdir / "server.log")
    deliveries = list(
        read_deliveries(write_deliveries(key, params.dispatch_count, workdir / "dispatch.tsv"))
    )
    bad: list[int] = []
    try:
        with server, httpx.Client(base_url=server.base_url, timeout=10) as client:
            interval = 1.0 / params.dispatch_rate
            start = time.monotonic()
            for i, d in enumerate(deliveries):
                delay = start + i * interval - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                response = client.post(WEBHOOK_PATH, content=d.body, headers=d.headers())
                if response.status_code != 200:
                    bad.append(response.status_code)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if len(read_latencies_ms(latency_file)) >= len(deliveries) - len(bad):
                    break
                time.sleep(0.1)
    except Exception as exc:
        return {
            "status": "error",
            "reason": f"{type(exc).__name__}: {exc}",
            "server_log": server.log_tail(),
        }
    latencies = read_latencies_ms(latency_file)
    problems = []
    if bad:
        problems.append(f"{len(bad)} non-200 answers, e.g. {bad[:5]}")
    if len(latencies) < len(deliveries):
        problems.append(f"callback ran for {len(latencies)} of {len(deliveries)} deliveries")
    out: dict[str, Any] = {
        "status": "invalid" if problems or not latencies else "ok",
        "problems": problems,
        "sent": len(deliveries),
        "rate_per_s": params.dispatch_rate,
        "callbacks": len(latencies),
    }
    if latencies:
        out.update(
            {
                "p50_ms": report.percentile(latencies, 50),
                "p99_ms": report.percentile(latencies, 99),
                "max_ms": max(latencies),
            }
        )
    log(f"  dispatch: {out['status']} {out.get('p50_ms')} ms p50")
    return out


# ---------------------------------------------------------------- micro ratio


def run_micro() -> dict[str, Any]:
    try:
        module = importlib.import_module("bench.verify_micro")
    except ImportError as exc:
        return {"status": "unavailable", "reason": str(exc), "ratio": None}
    try:
        raw = module.run()
    except Exception as exc:
        return {"status": "error", "reason": f"{type(exc).__name__}: {exc}", "ratio": None}
    value = raw.get("ratio") if isinstance(raw, dict) else raw
    return {
        "status": "ok",
        "ratio": float(value) if isinstance(value, int | float) else None,
        "raw": json.loads(json.dumps(raw, default=str)),
    }


# ---------------------------------------------------------------- environment


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def wrk_version_line(first_line: str) -> str:
    """``wrk debian/4.1.0-3+b2 [epoll] Copyright (C) …`` → ``wrk debian/4.1.0-3+b2 [epoll]``."""
    return first_line.split(" Copyright")[0].strip() or "wrk"


def load_average() -> str | None:
    """1/5/15-minute load: other work on the machine skews every number in the run."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def environment() -> dict[str, Any]:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    wrk_version = subprocess.run(
        [wrk_binary(), "-v"], capture_output=True, text=True, check=False
    ).stdout.splitlines()

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, cwd=REPO_ROOT, check=False
        ).stdout.strip()

    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(cpuinfo),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvicorn": _version("uvicorn"),
        "starlette": _version("starlette"),
        "sqlmodel": _version("sqlmodel"),
        "pynacl": _version("pynacl"),
        "uvloop": _version("uvloop"),
        "httptools": _version("httptools"),
        "wrk": wrk_version_line(wrk_version[0] if wrk_version else ""),
        "loadavg_at_start": load_average(),
        "git_commit": git("rev-parse", "--short", "HEAD") or None,
        # Uncommitted changes anywhere in the tree (e.g. receiver/ work in progress), but
        # not the benchmark's own results: the runs after the first would all say so.
        "git_dirty": bool(
            git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench/results")
        ),
    }


def ensure_wrk(log: Log) -> None:
    if shutil.which("wrk"):
        return
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise SystemExit(
            "wrk is not installed and cannot be installed here (needs root and apt-get). "
            "Install wrk 4.x (e.g. `apt-get install wrk`) and run again."
        )
    log("wrk not found; running: apt-get update && apt-get install -y wrk")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "wrk"]):
        if subprocess.run(cmd, env=env, check=False).returncode != 0:
            raise SystemExit(f"`{' '.join(cmd)}` failed; install wrk by hand and run again.")
    if not shutil.which("wrk"):
        raise SystemExit("apt-get installed no wrk binary; install wrk by hand and run again.")


# ---------------------------------------------------------------- the whole run


def run(
    targets: Sequence[str], params: Params, log: Log, pg: PgProbe | None = None
) -> dict[str, Any]:
    """Measure ``targets``; ``pg`` is the PostgreSQL probe if the caller already made it."""
    ensure_wrk(log)
    started = datetime.now(UTC)
    env = environment()
    wants_falhook = any(n in FALHOOKS for n in targets)
    falhook = probe_falhook() if wants_falhook else FalhookCli(False, "not selected")
    if wants_falhook and not falhook.available:
        log(f"falhook: unavailable ({falhook.reason})")
    if any(n in PG_TARGETS for n in targets):
        pg = pg if pg is not None else probe_pg()
        if not pg.available:
            log(f"PostgreSQL: unavailable ({pg.reason})")
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    with tempfile.TemporaryDirectory(prefix="falhook-bench-") as tmp:
        root = Path(tmp)
        # Interleaved rounds: a noisy minute on a shared VM then weighs on every target
        # alike, instead of on whichever target happened to run during it.
        for round_no, name in ((i, n) for i in range(params.rounds) for n in targets):
            target = REFERENCES.get(name) or FALHOOKS[name]
            runnable = (target.factory is not None or falhook.available) and (
                not target.postgres or (pg is not None and pg.available)
            )
            if runnable:
                how = f"{params.duration_s:g} s under wrk"
                if target.replicas > 1:
                    shares = " + ".join(
                        map(str, split_connections(params.connections, target.replicas))
                    )
                    how = f"{params.duration_s:g} s under {target.replicas} wrk ({shares} conns)"
                which = f" (round {round_no + 1} of {params.rounds})" if params.rounds > 1 else ""
                log(f"{name}{which}: {params.warmup_s:g} s warm-up + {how}")
            r = run_target(target, params, root / f"{name}-{round_no + 1}", log, falhook, pg)
            rounds[name].append(r)
            log(f"  {r['status']}" + (f": {r['reason']}" if r.get("reason") else ""))
        results = {name: report.combine_rounds(rs) for name, rs in rounds.items()}
        dispatch = (
            run_dispatch(params, root / "dispatch", log, falhook)
            if FALHOOK.name in targets
            else {"status": "not run"}
        )
    micro = run_micro() if params.micro else {"status": "skipped", "ratio": None}
    values = report.headline(results, dispatch)
    return {
        "date": started.isoformat(timespec="seconds"),
        "environment": env,
        "params": params.as_dict(),
        "targets": results,
        "dispatch": dispatch,
        "verify_micro": micro,
        "headline": values,
        "goals": report.evaluate(values),
        "comparisons": report.comparisons(values),
        "postgres": pg.as_dict() if pg is not None else {"status": "not probed"},
        "python_executable": sys.executable,
    }


def write_results(result: dict[str, Any], results_dir: Path) -> list[Path]:
    """latest.json / latest.md plus a timestamped copy of each; written via a .tmp rename."""
    results_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.fromisoformat(result["date"]).strftime("%Y%m%dT%H%M%SZ")
    payload = {"json": json.dumps(result, indent=2) + "\n", "md": report.render_markdown(result)}
    written = []
    for base in ("latest", stamp):
        for ext, text in payload.items():
            path = results_dir / f"{base}.{ext}"
            tmp = path.with_suffix(f".{ext}.tmp")
            tmp.write_text(text)
            tmp.replace(path)
            written.append(path)
    return written
