"""``python -m bench.inproc``: the event loop's CPU per delivery, in process, without HTTP.

wrk runs on a shared 2-core VM swing by ±10% from one minute to the next, which hides any
change of a few percent. This drives ``WebhookReceiver``'s ASGI app directly (32 concurrent
senders, uvloop, a SQLite file, a no-op async callback) and reports the loop thread's CPU
time per delivery, from the first stored delivery to the last one done, and the whole
process's. Deliveries are signed before the clock starts.

``--logs`` turns on what ``falhook serve`` does with its defaults: ``configure_logging`` at
INFO, the JSON lines going to a file (as with ``falhook serve 2>file``). ``--sync`` makes the
no-op callback a plain ``def`` (run off the loop) instead of an ``async def``. Like ``falhook
serve``, the harness sets a 0.5 ms GIL switch interval (``--switch-interval``).

For a figure that does not move with the machine at all, count instructions instead: run
it under ``valgrind --tool=callgrind`` with two sizes and divide the difference of the
totals by the difference of the sizes (start-up and warm-up cancel out)::

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.2000.%p \\
        .venv/bin/python -m bench.inproc --deliveries 2000
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.6000.%p \\
        .venv/bin/python -m bench.inproc --deliveries 6000
    grep -h ^totals /tmp/cg.2000.* /tmp/cg.6000.*   # (b - a) / 4000 = instructions/delivery

Add ``--separate-threads=yes`` to count the loop (the main thread, file ``*-01``) apart
from the threads that write logs, commit and run ``def`` callbacks.

``--tree PATH`` measures another checkout's ``receiver`` (e.g. a ``git worktree``) with
this checkout's harness.

``--otel`` sets up OpenTelemetry's SDK as the global tracer provider (needs
``falhook[otel]``): spans are batched and encoded as OTLP protobuf, as the OTLP exporter
does, then dropped instead of sent — what tracing costs the process, without a network.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.fixtures import Delivery, iter_deliveries, new_signing_key, write_jwks

SENDERS = 32
WARMUP = 2000


@dataclass(frozen=True)
class Result:
    deliveries: int
    loop_cpu_us: float  # the loop thread's CPU time per delivery
    per_second: float  # deliveries stored and dispatched per wall-clock second
    process_cpu_us: float = 0.0  # all threads' CPU time per delivery (logs, commits, callbacks)


async def _noop(delivery: Any) -> None:
    return None


def _sync_noop(delivery: Any) -> None:
    return None


def start_logs(path: Path) -> Callable[[], None]:
    """``falhook serve``'s logging at INFO, into ``path``; returns what stops it.

    ``configure_logging`` writes to ``sys.stderr``, so it is pointed at the file while the
    handler is built (an older checkout's version takes no stream argument).
    """
    from falhook.receiver import logs

    file = path.open("w")
    saved, sys.stderr = sys.stderr, file
    try:
        handle = logs.configure_logging("INFO")
    finally:
        sys.stderr = saved

    def stop() -> None:
        stopper = getattr(handle, "stop", None)
        if callable(stopper):
            stopper()  # drains what is still queued
        logger = logging.getLogger("falhook")
        for handler in logger.handlers:
            handler.flush()
        logger.handlers[:] = []
        logger.propagate = True
        file.close()

    return stop


def start_tracing() -> Callable[[], int]:
    """The SDK as the global provider; spans encoded as OTLP would send them, then dropped.
    Returns what stops it, and says how many spans were encoded."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    encoded = [0]

    class Encoded(SpanExporter):
        def export(self, spans: Sequence[Any]) -> SpanExportResult:
            encode_spans(spans).SerializeToString()
            encoded[0] += len(spans)
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Encoded()))
    trace.set_tracer_provider(provider)

    def stop() -> int:
        provider.shutdown()
        return encoded[0]

    return stop


def _scope(delivery: Delivery) -> dict[str, Any]:
    headers = [(k.lower().encode(), v.encode()) for k, v in delivery.headers().items()]
    headers.append((b"content-length", str(len(delivery.body)).encode()))
    return {
        "type": "http",
        "method": "POST",
        "path": "/webhooks/fal",
        "raw_path": b"/webhooks/fal",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
    }


async def measure(
    deliveries: Sequence[Delivery],
    jwks: Path,
    workdir: Path,
    *,
    callback: bool = True,
    sync: bool = False,
    warmup: int = WARMUP,
) -> Result:
    """Send ``deliveries`` (the first ``warmup`` unmeasured) and wait until all are done.

    ``sync``: the no-op callback is a plain ``def``.
    """
    from falhook.receiver.app import WebhookReceiver  # imported late: --tree picks the checkout
    from falhook.receiver.models import State
    from falhook.receiver.settings import Settings

    settings = Settings.from_env(
        {
            "FALHOOK_DATABASE_URL": f"sqlite:///{workdir / 'falhook.db'}",
            "FALHOOK_JWKS_URL": str(jwks),
        }
    )
    noop = _sync_noop if sync else _noop
    receiver = WebhookReceiver(settings, callbacks=[noop] if callback else [])
    await receiver.start()
    try:

        async def send(delivery: Delivery) -> None:
            statuses: list[int] = []
            body_sent = False

            async def receive() -> dict[str, Any]:
                nonlocal body_sent
                if body_sent:  # the app never asks again once it has the whole body
                    raise RuntimeError("receive() called after the body")
                body_sent = True
                return {"type": "http.request", "body": delivery.body, "more_body": False}

            async def reply(message: MutableMapping[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            await receiver.app(_scope(delivery), receive, reply)
            if statuses != [200]:
                raise RuntimeError(f"delivery {delivery.request_id} answered {statuses}")

        async def run(batch: Sequence[Delivery]) -> None:
            queue = iter(batch)

            async def sender() -> None:
                for delivery in queue:
                    await send(delivery)

            await asyncio.gather(*(sender() for _ in range(SENDERS)))

        async def all_done(total: int) -> None:
            # counts() is a synchronous read: run it off the loop, or it would be measured.
            deadline = time.monotonic() + 120
            while (await asyncio.to_thread(receiver.store.counts))[State.DONE] < total:
                if time.monotonic() > deadline:
                    raise RuntimeError("dispatch did not finish within 120 s")
                await asyncio.sleep(0.005)

        warm, measured = deliveries[:warmup], deliveries[warmup:]
        await run(warm)
        cpu, wall, total = time.thread_time(), time.perf_counter(), time.process_time()
        await run(measured)
        if callback:
            await all_done(len(deliveries))
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
        total = time.process_time() - total
    finally:
        await receiver.stop()
    n = len(measured)
    return Result(n, cpu / n * 1e6, n / wall, total / n * 1e6)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.inproc", description=__doc__.split("\n")[0])
    p.add_argument("--deliveries", type=int, default=20_000, help="measured (after a warm-up)")
    p.add_argument("--warmup", type=int, default=WARMUP, help="unmeasured, sent first")
    p.add_argument("--no-callback", action="store_true", help="store only: no dispatch")
    p.add_argument("--sync", action="store_true", help="a plain def no-op callback")
    p.add_argument("--logs", action="store_true", help="INFO logs to a file, as falhook serve")
    p.add_argument(
        "--switch-interval",
        type=float,
        default=0.0005,
        help="sys.setswitchinterval, as falhook serve sets it (default 0.0005)",
    )
    p.add_argument("--tree", type=Path, help="measure this checkout's receiver package")
    p.add_argument("--otel", action="store_true", help="record spans (OTLP-encoded, not sent)")
    args = p.parse_args(argv)
    if args.tree is not None:
        sys.path.insert(0, str(args.tree.resolve()))
    import uvloop

    sys.setswitchinterval(args.switch_interval)
    key = new_signing_key()
    deliveries = list(iter_deliveries(key, args.warmup + args.deliveries))
    with tempfile.TemporaryDirectory(prefix="falhook-inproc-") as tmp:
        jwks = write_jwks(key, Path(tmp) / "jwks.json")
        log_path = Path(tmp) / "falhook.log"
        stop_logs = start_logs(log_path) if args.logs else None
        stop_tracing = start_tracing() if args.otel else None
        spans = 0
        work = measure(
            deliveries,
            jwks,
            Path(tmp),
            callback=not args.no_callback,
            sync=args.sync,
            warmup=args.warmup,
        )
        try:
            result = uvloop.run(work)
        finally:
            if stop_logs is not None:
                stop_logs()
            if stop_tracing is not None:
                spans = stop_tracing()
        lines = log_path.read_bytes().count(b"\n") if args.logs else 0
    print(
        f"{result.deliveries:,} deliveries: loop CPU {result.loop_cpu_us:.1f} us/delivery, "
        f"process CPU {result.process_cpu_us:.1f} us/delivery, {result.per_second:,.0f}/s"
        + (f", {lines:,} log lines" if args.logs else "")
        + (f", {spans:,} spans" if args.otel else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
