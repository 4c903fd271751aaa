"""Recovery from fal's queue, end to end: real `falhook serve` processes, the real CLI, and
a loopback fake of fal's queue (tests/fakes/fal_queue.py) that can send the signed
webhook or withhold it. Recovery settings are fractions of a second, so each test is
quick; every wait polls with a deadline.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import SEED, SpawnServer
from tests.e2e.server import USER_ID, ServerProcess, wait_for
from tests.fakes.fal_queue import PAYLOAD_NOT_SERIALIZABLE, FakeFalQueue, ed25519_signer

pytestmark = pytest.mark.slow

KEY = "fal-test-key"
ENDPOINT = "fal-ai/flux/dev"
# Fast recovery for tests: poll after 0.3 s without a delivery, every 0.1 s at most, and
# give the webhook 0.3 s after fal says COMPLETED.
FAST = {
    "FALHOOK_RECOVER_AFTER_SECONDS": "0.3",
    "FALHOOK_RECOVER_POLL_SECONDS": "0.1",
    "FALHOOK_RECOVER_GRACE_SECONDS": "0.3",
    "FALHOOK_CALLBACK_BACKOFF_SECONDS": "0.1",
    "FALHOOK_POLL_SECONDS": "0.5",
}


@pytest.fixture
def fake() -> Iterator[FakeFalQueue]:
    # The fake signs webhooks with the e2e key (the same seed the JWKS server serves).
    signer = ed25519_signer(SEED, USER_ID)
    with FakeFalQueue(api_key=KEY, signer=signer, auto_webhook=True) as queue:
        yield queue


def serve(spawn: SpawnServer, fake: FakeFalQueue, *, key: str = KEY, **extra: str) -> ServerProcess:
    """A `falhook serve` with recovery on, whose public URL is its own address."""
    server = spawn(start=False)
    server.env.update(FAST)
    server.env.update(
        {
            "FALHOOK_FAL_KEY": key,
            "FALHOOK_QUEUE_URL": fake.url,
            "FALHOOK_PUBLIC_URL": server.url,
            **extra,
        }
    )
    return server.start()


def cli(
    server: ServerProcess, *args: str, key: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`falhook ARGS` with the server's environment (same store, key and queue)."""
    env = dict(server.env)
    if key is not None:
        env["FALHOOK_FAL_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "falhook.receiver", *args],
        env=env,
        cwd=server.workdir,
        capture_output=True,
        text=True,
        timeout=60,
    )


def submit(server: ServerProcess, endpoint: str = ENDPOINT, **input_: Any) -> str:
    path = server.workdir / "input.json"
    path.write_text(json.dumps(input_ or {"prompt": "dog"}))
    done = cli(server, "submit", endpoint, "--input", str(path))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def expectation(server: ServerProcess, request_id: str) -> dict[str, Any] | None:
    with sqlite3.connect(server.db_path, timeout=30) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute(
            "SELECT * FROM falhook_expectations WHERE request_id = ?", (request_id,)
        ).fetchone()
    return dict(row) if row is not None else None


def wait_state(server: ServerProcess, request_id: str, state: str) -> dict[str, Any]:
    def settled() -> dict[str, Any] | None:
        row = expectation(server, request_id)
        return row if row is not None and row["state"] == state else None

    try:
        return wait_for(settled, timeout=20, what=f"{request_id} {state}")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\nexpectation: {expectation(server, request_id)}\nlog:\n{server.log()}"
        ) from None


def done_records(server: ServerProcess, request_id: str, count: int = 1) -> list[dict[str, Any]]:
    records = server.wait_records(
        lambda rs: sum(r["request_id"] == request_id and r["phase"] == "done" for r in rs) >= count
    )
    return [r for r in records if r["request_id"] == request_id and r["phase"] == "done"]


def test_webhook_only_nothing_is_polled(spawn: SpawnServer, fake: FakeFalQueue) -> None:
    server = serve(spawn, fake, FALHOOK_RECOVER_AFTER_SECONDS="5")
    rid = submit(server)
    submitted = fake.get(rid)
    assert submitted.webhook_url == server.webhook_url  # ?fal_webhook= was sent
    assert submitted.input == {"prompt": "dog"}
    fake.complete(rid)
    (record,) = done_records(server, rid)
    assert record["source"] == "webhook" and record["payload"]["prompt"] == "dog"
    row = wait_state(server, rid, "arrived")
    assert row["polls"] == 0
    assert fake.status_polls(rid) == 0 and fake.result_fetches(rid) == 0


def test_no_webhook_is_recovered_and_a_late_webhook_is_a_duplicate(
    spawn: SpawnServer, fake: FakeFalQueue, client: Any
) -> None:
    server = serve(spawn, fake)
    rid = submit(server, prompt="cat")
    fake.withhold_webhook(rid)  # the webhook is lost (a mistyped URL, a long outage…)
    fake.complete(rid)
    (record,) = done_records(server, rid)
    assert record["source"] == "queue"
    assert record["status"] == "OK" and record["payload"]["seed"] == 17454220438242315174
    row = wait_state(server, rid, "recovered")
    assert row["queue_status"] == "COMPLETED"
    stored = server.row(rid)
    assert stored is not None and stored["source"] == "queue"
    assert fake.result_fetches(rid) == 1
    # fal's webhook comes after all: a duplicate, and the callback does not run again.
    assert fake.send_webhook(rid) == 200
    assert fake.webhook_deliveries[-1].status_code == 200
    metrics = client.get(server.url + "/metrics").text
    assert "falhook_recovered_total 1.0" in metrics
    assert 'falhook_expectations{state="recovered"} 1.0' in metrics
    assert 'falhook_queue_requests_total{outcome="ok"}' in metrics
    assert 'falhook_deliveries_received_total{outcome="duplicate",reason=""} 1.0' in metrics
    assert len(done_records(server, rid)) == 1
    listed = cli(server, "expectations", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    (shown,) = json.loads(listed.stdout)
    assert shown["state"] == "recovered" and shown["request_id"] == rid
    server.wait_for_log('"state": "recovered"')  # the JSON log line


def test_a_failed_request_becomes_an_error_delivery(spawn: SpawnServer, fake: FakeFalQueue) -> None:
    server = serve(spawn, fake)
    rid = submit(server)
    fake.withhold_webhook(rid)
    fake.complete(rid, error="Request timed out", error_type="request_timeout")
    (record,) = done_records(server, rid)
    assert record["source"] == "queue" and record["status"] == "ERROR"
    assert record["error"] == "Request timed out"
    assert record["payload"] == {"detail": "Request timed out", "error_type": "request_timeout"}
    wait_state(server, rid, "recovered")


def test_payload_error_gets_its_payload_from_the_queue_before_callbacks(
    spawn: SpawnServer, fake: FakeFalQueue
) -> None:
    server = serve(spawn, fake, FALHOOK_RECOVER_AFTER_SECONDS="30")
    rid = submit(server)
    fake.withhold_webhook(rid)
    fake.complete(rid, {"images": [{"url": "https://v3.fal.media/x.png"}], "seed": 7})
    assert fake.send_webhook(rid, payload_error=PAYLOAD_NOT_SERIALIZABLE) == 200
    (record,) = done_records(server, rid)
    assert record["payload"] == {"images": [{"url": "https://v3.fal.media/x.png"}], "seed": 7}
    assert record["payload_error"] == PAYLOAD_NOT_SERIALIZABLE
    assert record["source"] == "webhook"
    assert fake.result_fetches(rid) == 1
    wait_state(server, rid, "recovered")
    shown = cli(server, "deliveries", "show", rid, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["body"]["payload"]["seed"] == 7  # stored for replays


def test_payload_error_of_an_unknown_request_is_delivered_as_it_came(
    spawn: SpawnServer, fake: FakeFalQueue
) -> None:
    server = serve(spawn, fake)
    rid = fake.create(ENDPOINT, webhook_url=server.webhook_url)  # submitted elsewhere
    fake.withhold_webhook(rid)
    fake.complete(rid)
    assert fake.send_webhook(rid, payload_error=PAYLOAD_NOT_SERIALIZABLE) == 200
    (record,) = done_records(server, rid)
    assert record["payload"] is None and record["payload_error"] == PAYLOAD_NOT_SERIALIZABLE
    assert fake.result_fetches(rid) == 0  # the endpoint is unknown: nothing to fetch from


def test_an_endpoint_with_a_sub_path_is_polled_at_owner_app(
    spawn: SpawnServer, fake: FakeFalQueue
) -> None:
    server = serve(spawn, fake)
    endpoint = "fal-ai/fast-sdxl/image-to-image"
    rid = fake.create(endpoint, webhook_url=None, auto_advance_after=1)  # submitted elsewhere
    done = cli(server, "expect", rid, "--endpoint", endpoint)  # no URLs: falhook builds them
    assert done.returncode == 0, done.stderr
    (record,) = done_records(server, rid)
    assert record["source"] == "queue"
    paths = {r.path for r in fake.requests(request_id=rid)}
    assert f"/fal-ai/fast-sdxl/requests/{rid}/status" in paths
    assert f"/fal-ai/fast-sdxl/requests/{rid}" in paths


def test_a_bad_key_or_an_unknown_request_fails_without_hammering(
    spawn: SpawnServer, fake: FakeFalQueue
) -> None:
    server = serve(spawn, fake, key="wrong-key")
    rid = fake.create(ENDPOINT)
    assert cli(server, "expect", rid, "--endpoint", ENDPOINT).returncode == 0
    row = wait_state(server, rid, "failed")
    assert row["reason"].startswith("unauthorized:")
    good = serve(spawn, fake)
    missing = "00000000-0000-0000-0000-000000000000"
    assert cli(good, "expect", missing, "--endpoint", ENDPOINT).returncode == 0
    row = wait_state(good, missing, "failed")
    assert row["reason"].startswith("not_found:")
    failed = cli(good, "expectations", "list", "--state", "failed")
    assert missing in failed.stdout and "not_found" in failed.stdout
    # Give the pollers many poll intervals: a failed expectation is never polled again.
    wait_for(lambda: "expectation failed" in good.log(), timeout=10, what="log line")
    polls = fake.count("status")
    with pytest.raises(AssertionError):
        wait_for(lambda: fake.count("status") > polls, timeout=1.0, what="another poll")
    assert fake.status_polls(rid) == 1 and fake.status_polls(missing) == 1
    # Without a key, expect and submit refuse in one line with exit 2.
    for args in (["expect", "r", "--endpoint", ENDPOINT], ["submit", ENDPOINT, "--input", "-"]):
        env = {k: v for k, v in good.env.items() if k not in ("FALHOOK_FAL_KEY", "FAL_KEY")}
        refused = subprocess.run(
            [sys.executable, "-m", "falhook.receiver", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            input="{}",
        )
        assert refused.returncode == 2
        assert refused.stderr.count("\n") == 1 and "no fal key" in refused.stderr


def test_queue_down_then_up(spawn: SpawnServer, fake: FakeFalQueue) -> None:
    server = serve(spawn, fake)
    rid = submit(server)
    fake.down()  # connections refused (before anything could be polled)
    fake.withhold_webhook(rid)
    fake.complete(rid)
    wait_for(lambda: "unreachable" in server.log(), timeout=20, what="an unreachable poll")
    row = wait_state(server, rid, "polling")
    assert "unreachable" in row["reason"]  # the last error, while it is retried
    fake.fail(503, route="status", times=2)  # back, but failing for two more polls
    fake.up()
    (record,) = done_records(server, rid)
    assert record["source"] == "queue"
    wait_state(server, rid, "recovered")


def test_rate_limited_polls_honour_retry_after(spawn: SpawnServer, fake: FakeFalQueue) -> None:
    server = serve(spawn, fake)
    fake.fail(429, route="status", times=1, retry_after="1")  # the first status poll
    rid = submit(server)
    fake.withhold_webhook(rid)
    fake.complete(rid)
    (record,) = done_records(server, rid)
    assert record["source"] == "queue"
    polls = fake.requests("status", request_id=rid)
    assert polls[0].status_code == 429 and len(polls) >= 2
    assert polls[1].monotonic - polls[0].monotonic >= 0.95  # not before Retry-After


def test_an_expectation_survives_a_restart(spawn: SpawnServer, fake: FakeFalQueue) -> None:
    server = serve(spawn, fake, FALHOOK_RECOVER_AFTER_SECONDS="2")
    rid = submit(server)
    fake.withhold_webhook(rid)
    server.kill()  # a crash, before anything was polled
    fake.complete(rid)  # fal finishes while falhook is down
    assert fake.status_polls(rid) == 0
    server.start()
    (record,) = done_records(server, rid)
    assert record["source"] == "queue"
    wait_state(server, rid, "recovered")


def test_readme_setup_is_what_these_tests_run(tmp_path: Path) -> None:
    """The guide's three lines name the settings these tests use."""
    guide = Path(__file__).resolve().parents[2] / "docs" / "how-to" / "never-miss.md"
    section = guide.read_text()
    for name in ("FALHOOK_FAL_KEY", "FALHOOK_PUBLIC_URL", "falhook serve", "falhook submit"):
        assert name in section
