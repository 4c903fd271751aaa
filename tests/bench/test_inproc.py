"""The in-process loop-CPU harness: it really stores and dispatches what it sends."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from bench import inproc
from bench.fixtures import iter_deliveries, new_signing_key, write_jwks


@pytest.mark.parametrize("callback", [True, False])
def test_measure_stores_every_delivery_and_waits_for_dispatch(
    tmp_path: Path, callback: bool
) -> None:
    key = new_signing_key()
    deliveries = list(iter_deliveries(key, 150))
    jwks = write_jwks(key, tmp_path / "jwks.json")
    result = asyncio.run(inproc.measure(deliveries, jwks, tmp_path, callback=callback, warmup=50))
    assert result.deliveries == 100
    assert result.loop_cpu_us > 0 and result.per_second > 0
    from falhook.receiver.models import State
    from falhook.receiver.store import Store

    store = Store(f"sqlite:///{tmp_path / 'falhook.db'}")
    try:
        counts = store.counts()
    finally:
        store.engine.dispose()
    expected = State.DONE if callback else State.PENDING
    assert counts[expected] == 150


def test_main_prints_the_loop_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    assert inproc.main(["--deliveries", "60", "--warmup", "20"]) == 0
    assert "60 deliveries: loop CPU" in capsys.readouterr().out


def test_otel_records_every_delivery_s_spans() -> None:
    pytest.importorskip("opentelemetry.sdk", reason="needs the falhook[otel] extra")
    # In a process of its own: --otel sets the global tracer provider.
    command = [sys.executable, "-m", "bench.inproc", "--otel", "--deliveries", "60"]
    out = subprocess.run(
        [*command, "--warmup", "20"], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    # Each delivery: its request, its commit, its processing.
    assert "60 deliveries: loop CPU" in out and ", 240 spans" in out
