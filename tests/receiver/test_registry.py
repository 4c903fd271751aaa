"""CallbackRegistry: how callbacks are chosen, run, and remembered once they succeed."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from falhook.receiver import CallbackImportError, CallbackRegistry, Delivery
from falhook.receiver.registry import import_callback
from falhook.verify.testing import fal_body


def _delivery(status: str = "OK", request_id: str = "req-1") -> Delivery:
    return Delivery.from_body(
        fal_body(request_id, status=status), attempt=1, received_at=time.time()
    )


def _run(
    registry: CallbackRegistry, delivery: Delivery, done: tuple[str, ...] = ()
) -> tuple[list[str], BaseException | None]:
    async def main() -> tuple[list[str], BaseException | None]:
        with ThreadPoolExecutor(2) as executor:
            return await registry.run(delivery, done, executor)

    return asyncio.run(main())


def test_sync_callbacks_run_in_a_thread_and_async_ones_on_the_loop() -> None:
    registry = CallbackRegistry()
    threads: dict[str, int] = {}
    loop_thread = threading.get_ident()

    def sync_cb(delivery: Delivery) -> None:
        threads["sync"] = threading.get_ident()

    async def async_cb(delivery: Delivery) -> None:
        threads["async"] = threading.get_ident()

    registry.on_delivery(sync_cb)
    registry.on_delivery(async_cb)
    completed, error = _run(registry, _delivery())
    assert error is None
    assert threads["async"] == loop_thread
    assert threads["sync"] != loop_thread
    assert completed == registry.names


def test_sync_callback_does_not_block_the_loop() -> None:
    registry = CallbackRegistry()
    release = threading.Event()

    def blocking(delivery: Delivery) -> None:
        assert release.wait(10)

    registry.on_delivery(blocking)

    async def main() -> None:
        with ThreadPoolExecutor(1) as executor:
            task = asyncio.create_task(registry.run(_delivery(), (), executor))
            await asyncio.sleep(0)  # the callback is now in its thread, the loop is free
            assert not task.done()
            release.set()
            completed, error = await asyncio.wait_for(task, 10)
            assert error is None and len(completed) == 1

    asyncio.run(main())


def test_routing_by_status() -> None:
    registry = CallbackRegistry()
    calls: list[tuple[str, str]] = []

    @registry.on_ok
    def ok(delivery: Delivery) -> None:
        calls.append(("ok", delivery.request_id))

    @registry.on_error
    async def error(delivery: Delivery) -> None:
        calls.append(("error", delivery.request_id))

    @registry.on_delivery
    def anything(delivery: Delivery) -> None:
        calls.append(("any", delivery.request_id))

    _run(registry, _delivery("OK", "good"))
    _run(registry, _delivery("ERROR", "bad"))
    assert calls == [("ok", "good"), ("any", "good"), ("error", "bad"), ("any", "bad")]


def test_decorators_return_the_function() -> None:
    registry = CallbackRegistry()

    def fn(delivery: Delivery) -> None: ...

    assert registry.on_ok(fn) is fn
    assert registry.on_error(fn) is fn
    assert registry.on_delivery(fn) is fn
    assert len(registry) == 3
    with pytest.raises(ValueError, match="already registered"):
        registry.on_ok(fn)


def test_a_failure_does_not_stop_the_others_and_successes_are_not_rerun() -> None:
    registry = CallbackRegistry()
    calls: list[str] = []
    fail = [True]

    def first(delivery: Delivery) -> None:
        calls.append("first")

    async def flaky(delivery: Delivery) -> None:
        calls.append("flaky")
        if fail[0]:
            raise RuntimeError("flaky failed")

    def last(delivery: Delivery) -> None:
        calls.append("last")

    for fn in (first, flaky, last):
        registry.on_delivery(fn)
    completed, error = _run(registry, _delivery())
    assert isinstance(error, RuntimeError)
    assert calls == ["first", "flaky", "last"]
    names = registry.names
    assert completed == [names[0], names[2]]

    fail[0] = False
    calls.clear()
    completed2, error2 = _run(registry, _delivery(), tuple(completed))
    assert error2 is None
    assert calls == ["flaky"]  # the ones that succeeded before were not re-run
    assert sorted(completed2) == sorted(names)


def test_first_error_is_returned() -> None:
    registry = CallbackRegistry()

    def one(delivery: Delivery) -> None:
        raise KeyError("one")

    def two(delivery: Delivery) -> None:
        raise ValueError("two")

    registry.on_delivery(one)
    registry.on_delivery(two)
    completed, error = _run(registry, _delivery())
    assert completed == []
    assert isinstance(error, KeyError)


def test_callable_objects_and_coroutine_returning_sync_functions() -> None:
    registry = CallbackRegistry()
    seen: list[str] = []

    class AsyncHandler:
        async def __call__(self, delivery: Delivery) -> None:
            seen.append("object")

    async def coro(delivery: Delivery) -> None:
        seen.append("lambda")

    registry.add(AsyncHandler(), name="handler")
    registry.add(lambda d: coro(d), name="lambda")
    completed, error = _run(registry, _delivery())
    assert error is None
    assert sorted(seen) == ["lambda", "object"]
    assert completed == ["handler", "lambda"]


def test_import_callback_and_specs() -> None:
    fn = import_callback("tests.e2e.callbacks:record")
    assert callable(fn)
    assert import_callback("os.path:join") is __import__("os").path.join
    registry = CallbackRegistry()
    registry.add_specs(["os.path:join"])
    assert registry.names == ["os.path:join"]


@pytest.mark.parametrize(
    "spec",
    ["no_colon", ":fn", "mod:", "no_such_module_xyz:fn", "os.path:no_such_fn", "os:sep"],
)
def test_import_callback_errors(spec: str) -> None:
    with pytest.raises(CallbackImportError):
        import_callback(spec)


def test_callback_names_are_stable() -> None:
    registry = CallbackRegistry()

    def named(delivery: Any) -> None: ...

    registry.on_ok(named)
    assert registry.names == [
        f"{__name__}:test_callback_names_are_stable.<locals>.named",
    ]


def test_on_called_hears_each_call_its_time_and_outcome() -> None:
    registry = CallbackRegistry()

    def ok(delivery: Delivery) -> None:
        time.sleep(0.02)

    async def fails(delivery: Delivery) -> None:
        raise RuntimeError("no")

    async def slow(delivery: Delivery) -> None:
        await asyncio.Event().wait()

    for fn in (ok, fails, slow):
        registry.on_delivery(fn)
    heard: list[tuple[str, float, str]] = []

    async def main() -> None:
        with ThreadPoolExecutor(2) as executor:
            await registry.run(
                _delivery(),
                (),
                executor,
                timeout=0.2,
                on_called=lambda *call: heard.append(call),
            )

    asyncio.run(main())
    names = registry.names
    assert [(name, outcome) for name, _, outcome in heard] == [
        (names[0], "ok"),
        (names[1], "error"),
        (names[2], "timeout"),
    ]
    assert heard[0][1] >= 0.02 and heard[2][1] >= 0.2
