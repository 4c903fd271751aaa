"""hooks.submit / hooks.expect (and their sync twins) on an in-process receiver, against
the loopback fake of fal's queue; the CLI's submit, expect and expectations list."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from falhook.receiver import Settings, WebhookReceiver
from falhook.receiver.cli.main import main
from falhook.receiver.errors import (
    InvalidRequestError,
    QueueError,
    QueueFailure,
    RecoveryDisabledError,
)
from falhook.receiver.models import Delivery
from falhook.receiver.store import Store
from falhook.receiver.store.expectations import Expectations, ExpectationState
from tests.fakes.fal_queue import FakeFalQueue, wait_until

KEY = "fal-test-key"
ENDPOINT = "fal-ai/flux/dev"


@pytest.fixture
def fake() -> Iterator[FakeFalQueue]:
    with FakeFalQueue(api_key=KEY) as queue:
        yield queue


@pytest.fixture
def fast(settings: Settings, fake: FakeFalQueue) -> Settings:
    return settings.replace(
        fal_key=KEY,
        queue_url=fake.url,
        public_url="https://hooks.example.com",
        recover_after_seconds=0.1,
        recover_poll_seconds=0.05,
        recover_grace_seconds=0.05,
    )


def stored(url: str, request_id: str) -> Any:
    store = Store(url)
    try:
        return Expectations(store).get(request_id)
    finally:
        store.engine.dispose()


def test_submit_passes_fal_options_through_and_recovers(fast: Settings, fake: FakeFalQueue) -> None:
    got: list[Delivery] = []

    async def body() -> dict[str, Any]:
        hooks = WebhookReceiver(fast)
        seen = asyncio.Event()

        @hooks.on_delivery
        async def record(delivery: Delivery) -> None:
            got.append(delivery)
            seen.set()

        async with hooks:
            answer = await hooks.submit(
                ENDPOINT,
                {"prompt": "dog"},
                priority="low",
                start_timeout=30,
                hint="lora-1",
                headers={"X-Fal-Store-IO": "0"},
            )
            assert next(iter(answer)) == "request_id"
            fake.complete(answer["request_id"])
            await asyncio.wait_for(seen.wait(), 10)
        return answer

    answer = asyncio.run(body())
    rid = answer["request_id"]
    req = fake.get(rid)
    assert req.webhook_url == "https://hooks.example.com/webhooks/fal"
    assert req.platform_headers["x-fal-queue-priority"] == "low"
    assert req.platform_headers["x-fal-request-timeout"] == "30"
    assert req.platform_headers["x-fal-runner-hint"] == "lora-1"
    assert req.platform_headers["x-fal-store-io"] == "0"
    assert [(d.request_id, d.source) for d in got] == [(rid, "queue")]
    expected = stored(fast.database_url, rid)
    assert expected.origin == "submit" and expected.state is ExpectationState.RECOVERED
    assert expected.status_url == fake.request_urls(rid)["status_url"]


def test_sync_twins_work_without_a_running_receiver(fast: Settings, fake: FakeFalQueue) -> None:
    hooks = WebhookReceiver(fast)
    answer = hooks.submit_sync(ENDPOINT, {"prompt": "cat"})
    assert fake.get(answer["request_id"]).input == {"prompt": "cat"}
    assert hooks.expect_sync("elsewhere-1", "fal-ai/fast-sdxl/image-to-image")
    assert not hooks.expect_sync("elsewhere-1", "fal-ai/fast-sdxl/image-to-image")
    assert asyncio.run(hooks.expect("elsewhere-2", ENDPOINT))
    assert stored(fast.database_url, answer["request_id"]).state is ExpectationState.WAITING
    assert stored(fast.database_url, "elsewhere-1").origin == "expect"


def test_submit_and_expect_are_the_recoverys_own_methods(fast: Settings) -> None:
    hooks = WebhookReceiver(fast)
    assert hooks.recovery is not None
    assert hooks.submit == hooks.recovery.submit
    assert hooks.submit_sync == hooks.recovery.submit_sync
    assert hooks.expect == hooks.recovery.expect
    assert hooks.expect_sync == hooks.recovery.expect_sync
    assert WebhookReceiver.submit.__doc__ == type(hooks.recovery).submit.__doc__


def test_without_a_key_the_receiver_is_as_before(settings: Settings) -> None:
    hooks = WebhookReceiver(settings)
    assert hooks.recovery is None
    with pytest.raises(RecoveryDisabledError, match="FALHOOK_FAL_KEY"):
        hooks.expect_sync("r", ENDPOINT)
    with pytest.raises(RecoveryDisabledError):
        asyncio.run(hooks.submit(ENDPOINT, {}))
    assert b"falhook_expectations" not in hooks.metrics.render()


def test_unusable_input_is_refused_before_calling_fal(fast: Settings, fake: FakeFalQueue) -> None:
    hooks = WebhookReceiver(fast)
    with pytest.raises(InvalidRequestError, match="endpoint id"):
        hooks.submit_sync("not an endpoint", {})
    with pytest.raises(InvalidRequestError, match="priority"):
        hooks.submit_sync(ENDPOINT, {}, priority="urgent")
    with pytest.raises(InvalidRequestError, match="sends the fal key only there"):
        hooks.expect_sync("r", ENDPOINT, status_url="https://evil.example/status")
    # Headers httpx cannot send: refused here, not a traceback from deep in the call.
    with pytest.raises(InvalidRequestError, match="not a header value"):
        hooks.submit_sync(ENDPOINT, {}, hint="lora-\u00e9")
    with pytest.raises(InvalidRequestError, match="not a header value"):
        hooks.submit_sync(ENDPOINT, {}, headers={"X-A": "b\r\nX-B: c"})
    with pytest.raises(InvalidRequestError, match="not a header name"):
        hooks.submit_sync(ENDPOINT, {}, headers={"Bad Name": "v"})
    assert fake.count() == 0


def test_fal_refusing_a_submit_is_a_queue_error(fast: Settings, fake: FakeFalQueue) -> None:
    hooks = WebhookReceiver(fast.replace(fal_key="wrong"))
    with pytest.raises(QueueError) as caught:
        hooks.submit_sync(ENDPOINT, {})
    assert caught.value.failure is QueueFailure.UNAUTHORIZED
    assert "401" in str(caught.value)


def test_an_expectation_past_its_ttl_expires(fast: Settings, fake: FakeFalQueue) -> None:
    ttl = fast.replace(expect_ttl_seconds=0.2, recover_after_seconds=30)

    async def body() -> None:
        async with WebhookReceiver(ttl) as hooks:
            await hooks.expect("slow-1", ENDPOINT)
            deadline = time.monotonic() + 10
            while True:
                got = await asyncio.to_thread(stored, ttl.database_url, "slow-1")
                if got.state is ExpectationState.EXPIRED or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            assert got.state is ExpectationState.EXPIRED and "ttl" in got.reason
            metrics = await asyncio.to_thread(hooks.metrics.render)
            assert b'falhook_expectations{state="expired"} 1.0' in metrics

    asyncio.run(body())
    assert fake.count("status") == 0  # never polled: recover-after had not passed


def test_a_429_pauses_polling_for_its_retry_after(fast: Settings, fake: FakeFalQueue) -> None:
    rid = fake.create(ENDPOINT)
    fake.fail(429, route="status", times=1, retry_after="0.6")

    async def body() -> None:
        async with WebhookReceiver(fast) as hooks:
            await hooks.expect(rid, ENDPOINT)
            await asyncio.to_thread(wait_until, lambda: fake.status_polls(rid) >= 2, timeout=10)
            metrics = await asyncio.to_thread(hooks.metrics.render)
            assert b'falhook_queue_requests_total{outcome="rate_limited"} 1.0' in metrics

    asyncio.run(body())
    first, second = fake.requests("status", request_id=rid)[:2]
    assert first.status_code == 429
    assert second.monotonic - first.monotonic >= 0.55


# -- the CLI -----------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_expect_and_list(
    fast: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    Store(fast.database_url).migrate()  # as a running `falhook serve` would have
    monkeypatch.setenv("FALHOOK_DATABASE_URL", fast.database_url)
    monkeypatch.setenv("FAL_KEY", KEY)
    code, out, _ = run_cli(capsys, "expect", "r-1", "--endpoint", ENDPOINT)
    assert code == 0 and out == f"expecting r-1 ({ENDPOINT})\n"
    code, out, _ = run_cli(capsys, "expect", "r-1", "--endpoint", ENDPOINT, "--json")
    assert json.loads(out) == {"request_id": "r-1", "recorded": False}
    code, out, _ = run_cli(capsys, "expectations", "list")
    assert code == 0 and "r-1" in out and "waiting" in out
    code, out, _ = run_cli(capsys, "expectations", "list", "--json", "--state", "failed")
    assert code == 0 and json.loads(out) == []
    code, _, err = run_cli(capsys, "expect", "r-2", "--endpoint", "nope")
    assert code == 2 and err.count("\n") == 1 and "not a fal endpoint id" in err


def test_cli_refuses_without_a_key_or_a_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FAL_KEY", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.json").write_text("{}")
    for args in (
        ["expect", "r", "--endpoint", ENDPOINT],
        ["submit", ENDPOINT, "--input", "in.json"],
    ):
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and err.count("\n") == 1 and "no fal key" in err
    monkeypatch.setenv("FAL_KEY", KEY)
    code, _, err = run_cli(capsys, "expect", "r", "--endpoint", ENDPOINT)
    assert code == 3 and "no database at" in err
    assert list(tmp_path.iterdir()) == [tmp_path / "in.json"]  # created nothing


def test_cli_submit(
    fast: Settings,
    fake: FakeFalQueue,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    Store(fast.database_url).migrate()
    monkeypatch.setenv("FALHOOK_DATABASE_URL", fast.database_url)
    monkeypatch.setenv("FALHOOK_FAL_KEY", KEY)
    monkeypatch.setenv("FALHOOK_QUEUE_URL", fake.url)
    source = tmp_path / "input.json"
    source.write_text('{"prompt": "dog"}')
    code, out, err = run_cli(capsys, "submit", ENDPOINT, "--input", str(source))
    rid = out.strip()
    assert code == 0 and fake.get(rid).input == {"prompt": "dog"}
    assert "no FALHOOK_PUBLIC_URL" in err and fake.get(rid).webhook_url is None
    code, out, _ = run_cli(
        capsys, "submit", ENDPOINT, "--input", str(source), "--json",
        "--public-url", "https://h.example", "--header", "X-Fal-No-Retry: 1",
    )  # fmt: skip
    answer = json.loads(out)
    assert code == 0 and next(iter(answer)) == "request_id"
    assert fake.get(answer["request_id"]).platform_headers["x-fal-no-retry"] == "1"
    assert fake.get(answer["request_id"]).webhook_url == "https://h.example/webhooks/fal"
    source.write_text("{not json")
    code, _, err = run_cli(capsys, "submit", ENDPOINT, "--input", str(source))
    assert code == 2 and "is not JSON" in err
    source.write_text("{}")
    code, _, err = run_cli(capsys, "submit", ENDPOINT, "--input", str(source), "--fal-key", "no")
    assert code == 1 and "401" in err and err.count("\n") == 1
    fake.down()
    code, _, err = run_cli(capsys, "submit", ENDPOINT, "--input", str(source))
    assert code == 1 and "unreachable" in err


def test_a_payload_error_delivery_waits_for_the_queue_to_answer(
    fast: Settings, fake: FakeFalQueue, signer: Any
) -> None:
    """The queue fails the first fetch: that attempt fails (no callback runs without the
    payload), the retry fetches it, and the callback sees payload and payload_error."""
    import httpx

    rid = fake.create(ENDPOINT, state="COMPLETED", output={"seed": 1})
    fake.fail(503, route="result", times=1)
    got: list[Delivery] = []

    async def body() -> None:
        hooks = WebhookReceiver(fast.replace(recover_after_seconds=60))
        seen = asyncio.Event()

        @hooks.on_delivery
        async def record(delivery: Delivery) -> None:
            got.append(delivery)
            seen.set()

        async with hooks:
            await hooks.expect(rid, ENDPOINT)
            raw, headers = signer(rid, payload=None, payload_error="not JSON serializable")
            transport = httpx.ASGITransport(app=hooks.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                answer = await client.post("/webhooks/fal", content=raw, headers=headers)
            assert answer.status_code == 200
            await asyncio.wait_for(seen.wait(), 10)

    asyncio.run(body())
    (delivery,) = got
    assert delivery.payload == {"seed": 1}
    assert delivery.payload_error == "not JSON serializable"
    assert delivery.attempt == 2 and delivery.source == "webhook"
    assert [r.status_code for r in fake.requests("result", request_id=rid)] == [503, 200]
    assert stored(fast.database_url, rid).state is ExpectationState.RECOVERED


def _recorder(hooks: WebhookReceiver) -> tuple[list[Delivery], asyncio.Event]:
    got: list[Delivery] = []
    seen = asyncio.Event()

    @hooks.on_delivery
    async def record(delivery: Delivery) -> None:
        got.append(delivery)
        seen.set()

    return got, seen


def test_a_hanging_call_holds_one_slot_not_all_recovery(fast: Settings, fake: FakeFalQueue) -> None:
    # fal's queue never answers for one request: the others are still polled and recovered.
    stuck = fake.create(ENDPOINT)
    fake.stall(stuck)
    done = fake.create(ENDPOINT, state="COMPLETED")

    async def body() -> list[Delivery]:
        hooks = WebhookReceiver(fast)
        got, seen = _recorder(hooks)
        async with hooks:
            await hooks.expect(stuck, ENDPOINT)
            await asyncio.to_thread(wait_until, lambda: fake.stalled_calls() == 1, timeout=10)
            await hooks.expect(done, ENDPOINT)
            await asyncio.wait_for(seen.wait(), 10)
            assert fake.stalled_calls() == 1  # still hanging meanwhile
            fake.unstall()
        return got

    got = asyncio.run(body())
    assert [(d.request_id, d.source) for d in got] == [(done, "queue")]


def test_a_call_that_never_ends_is_cut_at_its_deadline(fake: FakeFalQueue) -> None:
    from falhook.receiver.recovery.client import QueueClient

    rid = fake.create(ENDPOINT)
    fake.stall(rid)

    async def body() -> None:
        client = QueueClient(fake.url, KEY, deadline=0.3)
        try:
            with pytest.raises(QueueError, match=r"did not answer within 0.3 s") as caught:
                await client.get(fake.request_urls(rid)["status_url"])
            assert caught.value.failure is QueueFailure.UNREACHABLE
        finally:
            await client.aclose()
            fake.unstall()

    asyncio.run(body())


@pytest.mark.parametrize("code", [400, 408, 409])
def test_a_one_off_4xx_is_asked_again_not_a_failure(
    fast: Settings, fake: FakeFalQueue, code: int, caplog: pytest.LogCaptureFixture
) -> None:
    # On the status URL and then on the result URL: a success stays a success.
    rid = fake.create(ENDPOINT, state="COMPLETED", output={"images": ["a.png"]})
    fake.fail(code, route="status", times=1)
    fake.fail(code, route="result", times=1)

    async def body() -> list[Delivery]:
        hooks = WebhookReceiver(fast)
        got, seen = _recorder(hooks)
        async with hooks:
            await hooks.expect(rid, ENDPOINT)
            await asyncio.wait_for(seen.wait(), 10)
        return got

    got = asyncio.run(body())
    assert [(d.request_id, d.status, d.payload) for d in got] == [
        (rid, "OK", {"images": ["a.png"]})
    ]
    assert [r.status_code for r in fake.requests("status", request_id=rid)][:2] == [code, 200]
    assert stored(fast.database_url, rid).state is ExpectationState.RECOVERED
    warned = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert warned and warned[0].startswith(f"fal's queue: status answered {code}: "), warned


def test_stopping_mid_call_gives_the_claim_back(fast: Settings, fake: FakeFalQueue) -> None:
    # Claimed and waiting on fal when the receiver stops: due again at once, not after the
    # lease (a minute or more) at the next start.
    rid = fake.create(ENDPOINT)
    fake.stall(rid)

    async def body() -> float:
        async with WebhookReceiver(fast) as hooks:
            await hooks.expect(rid, ENDPOINT)
            await asyncio.to_thread(wait_until, lambda: fake.stalled_calls() == 1, timeout=10)
            stopping = time.time()
        return stopping

    stopping = asyncio.run(body())
    fake.unstall()
    expected = stored(fast.database_url, rid)
    assert expected.claim_id is None and expected.state is not ExpectationState.FAILED
    assert stopping <= expected.due_at <= time.time()


def test_a_models_error_fetched_as_a_result_counts_as_an_answer_not_a_failure(
    fast: Settings, fake: FakeFalQueue, caplog: pytest.LogCaptureFixture
) -> None:
    # fal answers a failed request's result URL with its error (here a 504 request_timeout):
    # that is the result, so the call is "ok", not a server_error an alert would count.
    rid = fake.create(
        ENDPOINT,
        state="COMPLETED",
        error="Request timed out",
        error_type="request_timeout",
        status_code=504,
    )
    caplog.set_level(logging.INFO, logger="falhook.recovery")

    async def body() -> tuple[list[Delivery], bytes]:
        hooks = WebhookReceiver(fast)
        got, seen = _recorder(hooks)
        async with hooks:
            await hooks.expect(rid, ENDPOINT)
            await asyncio.wait_for(seen.wait(), 10)
            metrics = await asyncio.to_thread(hooks.metrics.render)
        return got, metrics

    got, metrics = asyncio.run(body())
    assert [(d.request_id, d.status) for d in got] == [(rid, "ERROR")]
    assert [r.status_code for r in fake.requests("result", request_id=rid)] == [504]
    assert b'falhook_queue_requests_total{outcome="ok"} 2.0' in metrics  # status, result
    assert b'outcome="server_error"' not in metrics
    # Its first poll says so in the log, as every change of an expectation does.
    polling = [r for r in caplog.records if r.getMessage().startswith("expectation polling")]
    assert [getattr(r, "request_id", None) for r in polling] == [rid]


def test_media_expiration_asks_fal_to_delete_the_media_sooner(
    fast: Settings, fake: FakeFalQueue
) -> None:
    hooks = WebhookReceiver(fast)
    answer = hooks.submit_sync(ENDPOINT, {"prompt": "cat"}, media_expiration=3600)
    preference = fake.get(answer["request_id"]).platform_headers
    assert json.loads(preference["x-fal-object-lifecycle-preference"]) == {
        "expiration_duration_seconds": 3600
    }
    by_setting = WebhookReceiver(fast.replace(fal_media_expiration_seconds=600))
    answer = by_setting.submit_sync(ENDPOINT, {"prompt": "dog"})
    preference = fake.get(answer["request_id"]).platform_headers
    assert preference["x-fal-object-lifecycle-preference"] == '{"expiration_duration_seconds": 600}'
    plain = hooks.submit_sync(ENDPOINT, {"prompt": "owl"})
    assert "x-fal-object-lifecycle-preference" not in fake.get(plain["request_id"]).platform_headers
    with pytest.raises(InvalidRequestError, match="media_expiration"):
        hooks.submit_sync(ENDPOINT, {}, media_expiration=-1)


def test_an_expired_expectation_is_told_to_the_notify_url(
    fast: Settings, fake: FakeFalQueue
) -> None:
    from tests.receiver.test_notify import Inbox

    inbox = Inbox()
    settings = fast.replace(expect_ttl_seconds=0.2, recover_after_seconds=30, notify_url=inbox.url)

    async def body() -> None:
        async with WebhookReceiver(settings) as hooks:
            await hooks.expect("slow-2", ENDPOINT)
            deadline = time.monotonic() + 10
            while not inbox.posts:
                assert time.monotonic() < deadline, "no notification"
                await asyncio.sleep(0.05)

    try:
        asyncio.run(body())
    finally:
        inbox.server.shutdown()
        inbox.server.server_close()
    [text] = inbox.texts()
    assert text.startswith("falhook: 1 expected result expired without arriving\n• slow-2")
