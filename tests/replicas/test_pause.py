"""Pausing dispatch with two replicas on one PostgreSQL store: paused on one, honoured by both.

The switch is flipped by `falhook dispatch` (a third process) and by each replica's own
view of the store; every invariant is read from SQL (the callbacks' own log) or /metrics.
"""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

from falhook.verify.testing import KeyPair
from tests.replicas.conftest import ROOT, Cluster, Database, Replica, Sender, wait_for


def _dispatch(database: Database, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "falhook.receiver", "dispatch", *args],
        env={"FALHOOK_DATABASE_URL": database.url, "PATH": "/usr/bin:/bin"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.strip()


def _paused_gauge(replica: Replica) -> float | None:
    try:
        text = httpx.get(replica.url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("falhook_dispatch_paused "):
            return float(line.split()[1])
    return None


def test_pause_from_the_cli_is_honoured_by_both_replicas(
    cluster: Cluster, database: Database, keypair: KeyPair
) -> None:
    # Slow callbacks and a short lease: the ones running at the pause must finish, their
    # leases renewed (each callback logged exactly once, never retaken by the other replica).
    replicas = cluster.start(2, test_callback_seconds="1.5", lease_seconds="1")
    sender = Sender(keypair)
    running = [f"run-{i}" for i in range(6)]
    assert sender.blast(replicas, running) == [200] * 6
    wait_for(
        lambda: sum(database.states().get(r) == "running" for r in running) == 6,
        10,
        "the first deliveries' callbacks to be running",
    )

    assert _dispatch(database, "pause", "--reason", "downstream down").startswith(
        "dispatch paused since"
    )
    set_at = time.monotonic()  # the switch is committed once the command has returned
    wait_for(
        lambda: all(_paused_gauge(r) == 1.0 for r in replicas), 5, "both replicas to be paused"
    )
    assert time.monotonic() - set_at < 2  # NOTIFY: within "a second or two"

    held = [f"held-{i}" for i in range(10)]
    assert sender.blast(replicas, held) == [200] * 10  # still verified, stored, acknowledged
    for replica in replicas:
        ready = httpx.get(replica.url + "/readyz", timeout=5)
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "dispatch": "paused"}

    # The callbacks that were running finish, once each: no lease was lost.
    wait_for(
        lambda: all(database.states().get(r) == "done" for r in running),
        15,
        "the running callbacks to finish",
    )
    assert {r: database.callback_counts().get(r) for r in running} == dict.fromkeys(running, 1)
    # Longer than the dispatchers' poll (1 s) and the switch's poll (1 s): nothing started.
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        counts = database.callback_counts()
        assert not any(r in counts for r in held), counts
        time.sleep(0.2)
    assert {database.states()[r] for r in held} == {"pending"}
    status = _dispatch(database, "status", "--json")
    assert '"paused": true' in status and "downstream down" in status

    assert _dispatch(database, "resume").startswith("dispatch running")
    database.assert_acked_done(held, timeout=20)
    assert {r: database.callback_counts()[r] for r in held} == dict.fromkeys(held, 1)
    assert all(_paused_gauge(r) == 0.0 for r in replicas)
