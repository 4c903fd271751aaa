"""Several receivers on one PostgreSQL database, under faults, checked in SQL.

Invariants (from ``falhook_deliveries`` and the callbacks' own ``callback_log``):
- a 200 is never lost: every acknowledged request_id ends ``done`` with ≥ 1 callback;
- without faults, each delivery's callback runs exactly once across replicas;
- after a fault the service recovers by itself: new deliveries get 200.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable

import pytest

from falhook.verify.testing import KeyPair
from tests.replicas.conftest import Cluster, Database, Replica, Sender, wait_for
from tests.replicas.proxy import TcpProxy

# A short lease under connection faults: an outcome that could not be recorded while the
# database was away (the dispatcher does not retry recording it) leaves its delivery
# running until the lease expires; with the default 60 s the suite would wait that long.
FAULT_LEASE = "3"


def _grown(sender: Sender, by: int) -> Callable[[], bool]:
    """A predicate: `by` more deliveries were acknowledged than now."""
    target = len(sender.acked) + by
    return lambda: len(sender.acked) >= target


class Load:
    """Sends new deliveries round-robin in a background thread until stopped."""

    def __init__(self, sender: Sender, replicas: list[Replica], prefix: str) -> None:
        self.sender = sender
        self.replicas = replicas
        self.prefix = prefix
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        async def main() -> None:
            while not self._stop.is_set():
                ids = [f"{self.prefix}-{self.sent + i}" for i in range(24)]
                self.sent += len(ids)
                await self.sender.send_all(self.replicas, ids, concurrency=24)
                await asyncio.sleep(0.02)

        asyncio.run(main())


def test_one_delivery_sent_30_times_across_3_replicas_runs_once(
    cluster: Cluster, database: Database, keypair: KeyPair
) -> None:
    replicas = cluster.start(3)
    sender = Sender(keypair)
    statuses = sender.blast(replicas, ["same"] * 30, concurrency=30)
    assert statuses == [200] * 30
    wait_for(lambda: database.states().get("same") == "done", 20, "the delivery to be done")
    # done is final (a duplicate of a done delivery changes nothing): the count is settled.
    assert database.callback_counts() == {"same": 1}
    assert database.scalar("SELECT count(*) FROM falhook_deliveries") == 1


def test_600_deliveries_over_3_replicas_each_handled_exactly_once(
    cluster: Cluster, database: Database, keypair: KeyPair
) -> None:
    replicas = cluster.start(3)
    sender = Sender(keypair)
    ids = [f"d{i:03}" for i in range(600)]
    assert sender.blast(replicas, ids, concurrency=48) == [200] * 600
    wait_for(
        lambda: (
            database.scalar("SELECT count(*) FROM falhook_deliveries WHERE state = 'done'") == 600
        ),
        60,
        "600 done",
    )
    assert (
        database.rows(
            "SELECT request_id, count(*) FROM callback_log GROUP BY 1 HAVING count(*) <> 1"
        )
        == []
    )
    assert database.scalar("SELECT count(DISTINCT request_id) FROM callback_log") == 600
    assert database.scalar("SELECT count(*) FROM falhook_deliveries WHERE attempts <> 1") == 0
    # The work really was shared (claims woken by NOTIFY across replicas).
    assert database.scalar("SELECT count(DISTINCT replica) FROM callback_log") >= 2


def test_sigkilled_replica_deliveries_are_finished_by_the_others(
    cluster: Cluster, database: Database, keypair: KeyPair
) -> None:
    replicas = cluster.start(3, lease_seconds="2", test_callback_seconds="3")
    victim = replicas[0]
    sender = Sender(keypair)
    ids = [f"k{i:03}" for i in range(120)]
    # Everything goes in through the victim: its dispatcher claims first (woken locally).
    assert sender.blast([victim], ids, concurrency=48) == [200] * 120
    wait_for(
        lambda: (
            database.scalar("SELECT count(*) FROM falhook_deliveries WHERE state = 'running'") >= 20
        ),
        10,
        "callbacks in flight",
        interval=0.02,
    )
    victim.kill()
    database.assert_acked_done(sender.acked, timeout=45)
    # Some deliveries were retaken after the victim's lease expired.
    assert database.scalar("SELECT max(attempts) FROM falhook_deliveries") >= 2
    # The survivors still answer.
    assert sender.blast(replicas[1:], ["after-kill"]) == [200]
    database.assert_acked_done(["after-kill"], timeout=20)


def test_terminated_connections_twice_under_load_lose_nothing(
    cluster: Cluster, database: Database, keypair: KeyPair
) -> None:
    replicas = cluster.start(3, lease_seconds=FAULT_LEASE)
    sender = Sender(keypair)
    with Load(sender, replicas, "t"):
        wait_for(lambda: len(sender.acked) >= 50, 20, "load")
        for _ in range(2):
            assert database.terminate_backends() >= 3
            wait_for(_grown(sender, by=50), 30, "acks after the kill")
    assert len(sender.acked) >= 150
    database.assert_acked_done(sender.acked, timeout=45)
    # Recovered by itself: new deliveries are acknowledged at once, on every replica.
    fresh = [f"fresh-{i}" for i in range(30)]
    assert sender.blast(replicas, fresh) == [200] * 30
    database.assert_acked_done(fresh, timeout=20)


def _outage_under_load(
    database: Database,
    sender: Sender,
    replicas: list[Replica],
    down: object,
    up: object,
) -> None:
    with Load(sender, replicas, "o"):
        wait_for(lambda: len(sender.acked) >= 50, 20, "load")
        down()  # type: ignore[operator]
        time.sleep(0.5)
        failures = wait_for(
            lambda: [r for r in replicas if r.get("/readyz") == 503], 15, "readyz 503 in outage"
        )
        assert failures
        assert all(r.get("/healthz") == 200 for r in replicas)  # the processes stay up
        time.sleep(2)  # the outage itself: keep the database away a little longer
        up()  # type: ignore[operator]
        wait_for(lambda: all(r.get("/readyz") == 200 for r in replicas), 30, "ready again")
        wait_for(_grown(sender, by=50), 30, "acks after the outage")
    assert 503 in sender.statuses  # the outage was real: requests were refused, not lost
    database.assert_acked_done(sender.acked, timeout=60)
    fresh = [f"fresh-{i}" for i in range(30)]
    assert sender.blast(replicas, fresh) == [200] * 30
    database.assert_acked_done(fresh, timeout=20)


def test_database_unreachable_for_seconds_under_load(
    cluster: Cluster, database: Database, keypair: KeyPair
) -> None:
    """Through a TCP proxy: cut every connection and refuse new ones for a few seconds."""
    import sqlalchemy as sa

    target = sa.make_url(database.url)
    with TcpProxy((target.host or "127.0.0.1", target.port or 5432)) as proxy:
        url = target.set(port=proxy.port).render_as_string(hide_password=False)
        from falhook.receiver.store.listener import libpq_conninfo

        replicas = cluster.start(
            3, database_url=url, log_dsn=libpq_conninfo(url), lease_seconds=FAULT_LEASE
        )
        sender = Sender(keypair)
        _outage_under_load(database, sender, replicas, proxy.refuse, proxy.resume)


def _pg_cluster() -> tuple[str, str] | None:
    if os.environ.get("FALHOOK_TEST_PG_RESTART") != "1" or not shutil.which("pg_ctlcluster"):
        return None
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    return (versions[-1], "main") if versions else None


# Read once at import: the autouse fixture clears FALHOOK_* variables before each test.
_CLUSTER = _pg_cluster()


@pytest.mark.skipif(
    _CLUSTER is None,
    reason="restarts the shared PostgreSQL server: set FALHOOK_TEST_PG_RESTART=1 (CI)",
)
def test_postgresql_restarted_under_load(
    cluster: Cluster, database: Database, keypair: KeyPair
) -> None:
    assert _CLUSTER is not None
    version, name = _CLUSTER
    replicas = cluster.start(3, lease_seconds=FAULT_LEASE)
    sender = Sender(keypair)

    def ctl(action: str) -> None:
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", version, name, action, "-m", "fast"]
            if action == "stop"
            else ["pg_ctlcluster", "--skip-systemctl-redirect", version, name, action],
            check=True,
            timeout=60,
        )

    _outage_under_load(database, sender, replicas, lambda: ctl("stop"), lambda: ctl("start"))
