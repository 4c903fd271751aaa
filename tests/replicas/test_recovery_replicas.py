"""Two replicas on one PostgreSQL database recover each lost result once.

Both poll fal's (fake) queue for the same expectations: claims are leased with ``FOR
UPDATE SKIP LOCKED``, so each request is fetched by one replica, stored once, and its
callback runs once — checked in SQL (callback_log) and in the fake's request log.
"""

from __future__ import annotations

import uuid

from falhook.receiver.recovery import Recovery
from falhook.receiver.settings import Settings
from tests.fakes.fal_queue import FakeFalQueue
from tests.replicas.conftest import Cluster, Database, wait_for

KEY = "fal-test-key"
ENDPOINT = "fal-ai/flux/dev"


def test_two_replicas_recover_each_request_once(cluster: Cluster, database: Database) -> None:
    with FakeFalQueue(api_key=KEY) as fake:
        replicas = cluster.start(
            2,
            fal_key=KEY,
            queue_url=fake.url,
            recover_after_seconds="0.2",
            recover_poll_seconds="0.1",
            recover_grace_seconds="0.2",
        )
        settings = Settings(
            database_url=database.url,
            fal_key=KEY,
            queue_url=fake.url,
            recover_after_seconds=0.2,
        )
        recovery = Recovery(settings)
        rids = [fake.create(ENDPOINT, request_id=str(uuid.uuid4())) for _ in range(8)]
        for rid in rids:
            assert recovery.expect_sync(rid, ENDPOINT)
            fake.complete(rid, {"n": rid})  # no webhook: nobody gave fal a URL

        def all_recovered() -> bool:
            states = dict(database.rows("SELECT request_id, state FROM falhook_expectations"))
            return all(states.get(r) == "recovered" for r in rids)

        try:
            wait_for(all_recovered, 30, "every expectation recovered")
            database.assert_acked_done(rids, timeout=30)
        except AssertionError:
            raise AssertionError("\n".join(r.log() for r in replicas)) from None
        counts = database.callback_counts()
        assert {r: counts.get(r) for r in rids} == dict.fromkeys(rids, 1)
        sources = dict(database.rows("SELECT request_id, source FROM falhook_deliveries"))
        assert {sources[r] for r in rids} == {"queue"}
        assert all(fake.result_fetches(r) == 1 for r in rids)  # claims are exclusive
