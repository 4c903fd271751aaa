"""What fal's queue answers for a result, when it is not a usable result: a real `falhook
serve` recovering from the loopback fake of fal's queue (tests/fakes/fal_queue.py). An
answer that is not a JSON object is never stored (fal's webhook must still get through);
a result over the size limit ends its expectation, bounded in memory, while deliveries
keep being acknowledged.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import SpawnServer
from tests.e2e.server import Sender, ServerProcess, wait_for
from tests.e2e.test_recovery import done_records, serve, submit, wait_state
from tests.e2e.test_recovery import fake as fake  # the fixture: its loopback queue
from tests.fakes.fal_queue import FakeFalQueue

pytestmark = pytest.mark.slow

_BAD_ANSWERS = {
    "html": (b"<html><body>502 Bad Gateway</body></html>", "text/html"),
    "truncated": (b'{"images": [{"url": "https://v3.fal.media/files/x.png"', "application/json"),
    "bare_string": (b'"done"', "application/json"),
}


@pytest.mark.parametrize("kind", sorted(_BAD_ANSWERS))
def test_a_result_that_is_not_a_json_object_is_retried_not_stored(
    spawn: SpawnServer, fake: FakeFalQueue, client: httpx.Client, kind: str
) -> None:
    server = serve(spawn, fake)
    rid = submit(server)
    fake.withhold_webhook(rid)
    real = {"images": [{"url": "https://v3.fal.media/files/real.png"}], "seed": 3}
    fake.complete(rid, real)
    body, content_type = _BAD_ANSWERS[kind]
    fake.answer_result_raw(rid, body, content_type=content_type)
    # Asked again (a bad answer is transient), and nothing is stored meanwhile.
    wait_for(lambda: fake.result_fetches(rid) >= 2, timeout=20, what="a second result fetch")
    assert server.row(rid) is None
    row = wait_state(server, rid, "polling")
    assert "without a JSON object" in row["reason"]
    assert not [r for r in server.records() if r["request_id"] == rid]
    metrics = client.get(server.url + "/metrics").text
    assert 'falhook_queue_requests_total{outcome="bad_answer"}' in metrics
    # fal's own webhook arrives: it is new, and the callback gets the real result.
    assert fake.send_webhook(rid) == 200
    (record,) = done_records(server, rid)
    assert record["source"] == "webhook"
    assert record["payload"] == real
    wait_state(server, rid, "arrived")


def _peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None, status
    return int(match.group(1)) / 1024


def _big_result(mib: int) -> Iterator[bytes]:
    """A JSON object of about `mib` MiB, made as it is sent (the fake never holds it)."""
    item = b'{"url": "https://v3.fal.media/files/fake/image.png", "width": 1024}, '
    per_mib = (1 << 20) // len(item)
    yield b'{"images": ['
    for _ in range(mib):
        yield item * per_mib
    yield b'{"url": "https://v3.fal.media/files/fake/last.png"}], "seed": 1}'


class _Acks:
    """Signed deliveries posted one after another from a thread; each one's time to 200."""

    def __init__(self, server: ServerProcess, sender: Sender) -> None:
        self.server, self.sender = server, sender
        self.times: list[float] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="acks", daemon=True)

    def __enter__(self) -> _Acks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with httpx.Client(timeout=30.0) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                started = time.monotonic()
                response = self.sender.post(client, self.server.webhook_url, f"ack-{n}")
                if response.status_code != 200:
                    self.failures.append(f"{response.status_code} {response.text}")
                self.times.append(time.monotonic() - started)


def test_a_result_over_the_limit_fails_bounded_while_acks_flow(
    spawn: SpawnServer, fake: FakeFalQueue, sender: Sender, client: httpx.Client
) -> None:
    limit_mib = 2
    server = serve(spawn, fake, FALHOOK_MAX_BODY_BYTES=str(limit_mib << 20))
    baseline = _peak_rss_mib(server.pid)
    rid = submit(server)
    fake.withhold_webhook(rid)
    fake.complete(rid)
    fake.answer_result_raw(rid, lambda: _big_result(64))  # 64 MiB of a valid result
    with _Acks(server, sender) as acks:
        row = wait_state(server, rid, "failed")
        # Acknowledgements went on while the result was fetched and refused.
        wait_for(lambda: len(acks.times) >= 5, timeout=20, what="acknowledgements")
    assert not acks.failures, acks.failures
    assert max(acks.times) < 2.0, sorted(acks.times)[-5:]
    assert row["reason"].startswith("result_too_large:"), row["reason"]
    assert server.row(rid) is None
    # Never the whole result in memory: far less than its 64 MiB over the baseline.
    assert _peak_rss_mib(server.pid) - baseline < 40, (baseline, _peak_rss_mib(server.pid))
    metrics = client.get(server.url + "/metrics").text
    assert 'falhook_queue_requests_total{outcome="result_too_large"} 1.0' in metrics
    server.wait_for_log('"reason": "result_too_large:')
    # Failed for good: never fetched again.
    fetches = fake.result_fetches(rid)
    with pytest.raises(AssertionError):
        wait_for(lambda: fake.result_fetches(rid) > fetches, timeout=1.0, what="another fetch")


def test_a_big_result_under_the_limit_is_recovered_while_acks_flow(
    spawn: SpawnServer, fake: FakeFalQueue, sender: Sender
) -> None:
    server = serve(spawn, fake, FALHOOK_MAX_BODY_BYTES=str(16 << 20))
    rid = submit(server)
    fake.withhold_webhook(rid)
    fake.complete(rid)
    fake.answer_result_raw(rid, lambda: _big_result(8))
    with _Acks(server, sender) as acks:
        wait_state(server, rid, "recovered")
        (record,) = done_records(server, rid)
        wait_for(lambda: len(acks.times) >= 5, timeout=20, what="acknowledgements")
    assert record["source"] == "queue" and record["status"] == "OK"
    assert not acks.failures, acks.failures
    assert max(acks.times) < 2.0, sorted(acks.times)[-5:]
