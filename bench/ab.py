"""``python -m bench.ab``: is change B faster than A? Interleaved A/B of ``falhook serve``.

Each variant is a source tree of falhook (this checkout, or a ``git worktree`` of another
commit) plus optional environment settings; every round runs each variant once, on a fresh
server, key and SQLite database, under the same wrk load as ``python -m bench``. Per variant
it prints the median req/s, p99, the server's CPU per request (all its threads, from
/proc; with ``--threads``, each thread's too, busiest first) and whether dispatch kept up.
Servers run with ``falhook serve``'s defaults (INFO logs) and an ``async def`` no-op
callback; a variant's settings change that (``FALHOOK_LOG_LEVEL=warning``,
``FALHOOK_CALLBACK=bench.callbacks:noop_def``). On a shared VM only interleaved rounds are worth
comparing: the same code moved between 4.2k and 7k req/s from one minute to the next.

    git worktree add /tmp/base HEAD~1
    .venv/bin/python -m bench.ab base=/tmp/base new=. c32=.:FALHOOK_CONCURRENCY=32
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench import backlog
from bench.fixtures import new_signing_key, write_deliveries
from bench.fixtures import write_jwks as write_jwks_file
from bench.runner import deliveries_dir, falhook_env, main_deliveries
from bench.servers import Server, free_port, stat_cpu_seconds
from bench.wrk import lua_script, run_wrk

WEBHOOK_PATH = "/webhooks/fal"


@dataclass(frozen=True)
class Variant:
    name: str
    tree: Path
    env: dict[str, str] = field(default_factory=dict)


def parse_variant(text: str) -> Variant:
    """``NAME=PATH`` or ``NAME=PATH:KEY=VALUE,KEY=VALUE``."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH[:KEY=VALUE,...], got {text!r}")
    path, _, settings = rest.partition(":")
    env: dict[str, str] = {}
    for item in filter(None, settings.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {item!r}")
        env[key] = value
    tree = Path(path).resolve()
    if not (tree / "receiver" / "__main__.py").exists():  # both layouts keep receiver/
        raise argparse.ArgumentTypeError(f"{tree} is not a falhook source tree")
    return Variant(name, tree, env)


def _thread_cpu(pid: int) -> dict[int, float]:
    """User + system CPU seconds of each thread of ``pid`` so far."""
    seconds = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            seconds[int(tid)] = stat_cpu_seconds(Path(f"/proc/{pid}/task/{tid}/stat"))
        except OSError:  # the thread ended meanwhile
            continue
    return seconds


@dataclass(frozen=True)
class Sample:
    rps: float
    p99_ms: float
    cpu_us: float
    done_at_end: float | None
    problems: tuple[str, ...]
    threads_us: tuple[float, ...] = ()  # CPU per request of each thread: the loop's first


def run_once(variant: Variant, workdir: Path, duration_s: float, connections: int) -> Sample:
    workdir.mkdir(parents=True)
    key = new_signing_key()
    jwks = write_jwks_file(key, workdir / "jwks.json")
    script = workdir / "deliveries.lua"
    script.write_text(lua_script(WEBHOOK_PATH, count_non2xx=True))
    port = free_port()
    # Trees from before the falhook namespace ran as `-m receiver`.
    module = "falhook.receiver" if (variant.tree / "falhook").is_dir() else "receiver"
    command = [sys.executable, "-m", module, "serve", "--host", "127.0.0.1"]
    command += ["--port", str(port)]
    if "FALHOOK_CALLBACK" not in variant.env:
        command += ["--callback", "bench.callbacks:noop"]
    # The variant's tree first; `Server` adds this checkout after it, for bench.callbacks.
    env = {**falhook_env(workdir, jwks), "PYTHONPATH": str(variant.tree), **variant.env}
    with (
        deliveries_dir(workdir) as data,
        Server(
            variant.name, command, port, env, workdir / "server.log", cwd=variant.tree
        ) as server,
    ):
        warm = write_deliveries(key, 20_000, data / "warmup.tsv")
        main = write_deliveries(key, main_deliveries(10_000, duration_s), data / "main.tsv")
        url = server.base_url + WEBHOOK_PATH
        run_wrk(url, script, warm, duration_s=2, connections=connections)
        assert server.proc is not None
        pid = server.proc.pid
        before = _thread_cpu(pid)
        result, _ = run_wrk(url, script, main, duration_s=duration_s, connections=connections)
        after = _thread_cpu(pid)
        used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
        cpu = sum(used.values())
        drained = backlog.measure(env["FALHOOK_DATABASE_URL"])
    problems = tuple(result.problems + backlog.problems(drained))
    return Sample(
        rps=result.rps,
        p99_ms=result.p99_ms,
        cpu_us=cpu / max(1, result.requests) * 1e6,
        threads_us=tuple(
            used[tid] / max(1, result.requests) * 1e6
            for tid in [pid, *sorted((t for t in used if t != pid), key=lambda t: -used[t])]
            if tid in used
        ),
        done_at_end=drained["done_at_end"],
        problems=problems,
    )


def summary(name: str, samples: list[Sample]) -> str:
    rates = ", ".join(f"{s.rps:,.0f}" for s in samples)
    done = [s.done_at_end for s in samples if s.done_at_end is not None]
    return (
        f"{name:>12}  median {statistics.median(s.rps for s in samples):8,.0f} req/s "
        f"(rounds: {rates})  p99 {statistics.median(s.p99_ms for s in samples):6.1f} ms  "
        f"cpu/req {statistics.median(s.cpu_us for s in samples):6.1f} us  "
        f"dispatched at end {min(done):.0%}"
        if done
        else f"{name:>12}  no valid rounds"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    p.add_argument("variants", nargs="+", type=parse_variant, help="NAME=PATH[:KEY=VALUE,...]")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--duration", type=float, default=6.0, help="seconds per variant and round")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--threads", action="store_true", help="each thread's CPU per request")
    args = p.parse_args(argv)
    samples: dict[str, list[Sample]] = {v.name: [] for v in args.variants}
    with tempfile.TemporaryDirectory(prefix="falhook-ab-") as tmp:
        for round_no in range(args.rounds):
            for variant in args.variants:
                s = run_once(
                    variant,
                    Path(tmp) / f"{variant.name}-{round_no}",
                    args.duration,
                    args.connections,
                )
                samples[variant.name].append(s)
                flag = f"  INVALID: {'; '.join(s.problems)}" if s.problems else ""
                if args.threads:
                    flag += "  threads " + " ".join(f"{t:.0f}" for t in s.threads_us if t >= 0.5)
                print(
                    f"round {round_no + 1} {variant.name:>12} {s.rps:8,.0f} req/s  "
                    f"p99 {s.p99_ms:6.1f} ms  cpu/req {s.cpu_us:6.1f} us{flag}",
                    flush=True,
                )
    for name, runs in samples.items():
        print(summary(name, [s for s in runs if not s.problems]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
