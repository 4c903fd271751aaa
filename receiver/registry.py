"""Callbacks: who is told about a delivery, and how each one is run."""

from __future__ import annotations

import asyncio
import functools
import inspect
import time
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from importlib import import_module
from typing import Any, Literal, TypeVar

from falhook.receiver.deadlines import Deadlines
from falhook.receiver.errors import CallbackImportError, CallbackTimeoutError
from falhook.receiver.models import Delivery
from falhook.receiver.sync_runner import SyncCall, SyncRunner

__all__ = ["Callback", "CallbackRegistry", "import_callback"]

Callback = Callable[[Delivery], Any]  # sync, or async returning an awaitable
Kind = Literal["ok", "error", "any"]
F = TypeVar("F", bound=Callback)
# A sync callback's call, as long as its thread runs: `done()`, `add_done_callback()`.
RunningCall = Future[Any] | SyncCall
# Told of a callback that timed out: its name, and for a sync one the call still running
# in its thread (a thread cannot be cancelled), else None.
OnTimeout = Callable[[str, "RunningCall | None"], None]
OnCalled = Callable[[str, float, str], None]  # (callback name, seconds, ok|error|timeout)


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str  # stable across restarts: recorded when it succeeds, so it is not re-run
    kind: Kind
    fn: Callback
    is_async: bool

    def wants(self, delivery: Delivery) -> bool:
        if self.kind == "any":
            return True
        return (self.kind == "ok") == (delivery.status == "OK")


def callback_name(fn: Callable[..., Any]) -> str:
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}:{qualname}"


def _is_async(fn: Callable[..., Any]) -> bool:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 — an async __call__ on an object
    )


def import_callback(spec: str) -> Callback:
    """Import ``package.module:function`` (attributes may be dotted)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CallbackImportError(f"callback {spec!r} is not of the form module:function")
    try:
        target: Any = import_module(module_name)
    except ImportError as exc:
        raise CallbackImportError(f"cannot import module {module_name!r}: {exc}") from exc
    except SyntaxError as exc:
        where = f" ({exc.filename}, line {exc.lineno})" if exc.filename else ""
        raise CallbackImportError(
            f"callback module {module_name!r} has a syntax error: {exc.msg}{where}"
        ) from exc
    except Exception as exc:  # the module's own code raised while it was imported
        raise CallbackImportError(
            f"callback module {module_name!r} raised on import: "
            f"{type(exc).__name__}: {exc}{_where(exc)}"
        ) from exc
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise CallbackImportError(f"{module_name!r} has no attribute {attr!r}") from exc
    if not callable(target):
        raise CallbackImportError(f"callback {spec!r} is not callable")
    fn: Callback = target
    return fn


def _where(exc: BaseException) -> str:
    """`` (file, line N)`` of the frame that raised, skipping importlib's own frames."""
    frames = [
        f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<frozen")
    ]
    return f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""


class CallbackRegistry:
    """The callbacks of one receiver, by delivery status.

    Use as decorators::

        @hooks.on_ok
        async def save(delivery): ...

    Async callbacks are awaited on the event loop; sync ones run in a thread pool.
    """

    def __init__(self) -> None:
        self._entries: list[_Entry] = []
        # The async callback each task is awaiting, for the loop watchdog to name the one
        # that blocks the loop (read from its thread: a plain dict lookup).
        self.on_loop: dict[asyncio.Task[Any], str] = {}

    def add(self, fn: Callback, *, kind: Kind = "any", name: str | None = None) -> None:
        """Register `fn` for OK deliveries, ERROR deliveries, or any."""
        entry_name = name or callback_name(fn)
        if any(e.name == entry_name and e.kind == kind for e in self._entries):
            raise ValueError(f"callback {entry_name!r} is already registered")
        self._entries.append(_Entry(entry_name, kind, fn, _is_async(fn)))

    def on_ok(self, fn: F) -> F:
        """Register `fn` for deliveries whose status is "OK"."""
        self.add(fn, kind="ok")
        return fn

    def on_error(self, fn: F) -> F:
        """Register `fn` for deliveries whose status is "ERROR"."""
        self.add(fn, kind="error")
        return fn

    def on_delivery(self, fn: F) -> F:
        """Register `fn` for every delivery."""
        self.add(fn, kind="any")
        return fn

    def add_specs(self, specs: Iterable[str]) -> None:
        """Register ``module:function`` callbacks for every delivery."""
        for spec in specs:
            self.add(import_callback(spec), kind="any", name=spec)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self._entries]

    def matching(self, delivery: Delivery) -> list[_Entry]:
        return [e for e in self._entries if e.wants(delivery)]

    async def run(
        self,
        delivery: Delivery,
        done: Iterable[str],
        executor: SyncRunner | Executor | None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 — per callback, not for the call
        deadlines: Deadlines | None = None,
        on_timeout: OnTimeout | None = None,
        on_called: OnCalled | None = None,
    ) -> tuple[list[str], BaseException | None]:
        """Run every matching callback not already in `done`, in registration order.

        Returns the names that have now succeeded (including `done`) and the first
        exception, if any. A failure does not stop the callbacks after it: each succeeds
        at most once across attempts, because its success is recorded. A callback still
        running after `timeout` seconds is cancelled (async) or left to its thread (sync)
        and counts as failed with `CallbackTimeoutError`; `on_timeout` is told. Sync
        callbacks run in `executor`: a `SyncRunner` (the dispatcher's: one thread hand-off
        per batch) or any `Executor`. `on_called(name, seconds, outcome)` hears of each
        call: ok, error or timeout. ``deadlines`` times them (default: this call's own).
        """
        completed = list(done)
        first_error: BaseException | None = None
        scopes = deadlines if deadlines is not None else Deadlines()
        for entry in self.matching(delivery):
            if entry.name in completed:
                continue
            deadline = scopes.scope(timeout)
            thread: list[RunningCall] = []
            began = time.perf_counter()
            try:
                async with deadline:
                    await self._call(entry, delivery, executor, thread)
            except Exception as exc:  # a callback's failure is data, not our crash
                outcome = "error"
                if isinstance(exc, TimeoutError) and deadline.expired():
                    outcome = "timeout"
                    exc = CallbackTimeoutError(f"{entry.name} timed out after {timeout:g} s")
                    if on_timeout is not None:
                        running = thread[0] if thread and not thread[0].done() else None
                        on_timeout(entry.name, running)
                if on_called is not None:
                    on_called(entry.name, time.perf_counter() - began, outcome)
                if first_error is None:
                    first_error = exc
                continue
            if on_called is not None:
                on_called(entry.name, time.perf_counter() - began, "ok")
            completed.append(entry.name)
        return completed, first_error

    async def _call(
        self,
        entry: _Entry,
        delivery: Delivery,
        executor: SyncRunner | Executor | None,
        thread: list[RunningCall],
    ) -> None:
        if entry.is_async:
            task = asyncio.current_task()
            assert task is not None
            self.on_loop[task] = entry.name
            try:
                await entry.fn(delivery)
            finally:
                self.on_loop.pop(task, None)
            return
        loop = asyncio.get_running_loop()
        if isinstance(executor, SyncRunner):
            calls: list[SyncCall] = []
            try:
                result = await executor.run(entry.fn, delivery, calls)
            finally:
                thread.extend(calls)  # a timeout cannot stop the thread: the caller is told
        elif executor is None:
            result = await loop.run_in_executor(None, entry.fn, delivery)
        else:
            future = executor.submit(entry.fn, delivery)
            thread.append(future)  # a timeout cannot stop the thread: the caller is told
            result = await asyncio.wrap_future(future)
        if inspect.isawaitable(result):  # a sync-looking callable returned a coroutine
            await result
