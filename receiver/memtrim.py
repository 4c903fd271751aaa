"""Give memory back to the operating system after large bodies.

A large body passes through several big objects: the bytes read, their parsed JSON (parsed
in a worker thread, so from that thread's malloc arena), the stored row, the callbacks'
`Delivery`. Once they are freed, glibc gives back what it can by shrinking a heap from its
top, but free pages below memory still in use stay with the process: 10-35 MiB after a
burst of 8 MiB deliveries (bench/README.md, "Design figures"). ``malloc_trim(0)`` hands
the free pages of every heap back. It takes milliseconds on a big heap and holds each
heap's lock meanwhile, so it runs in a worker thread, only after large bodies, only once
they are let go, and at most once every few seconds.

Where there is no ``malloc_trim`` (not glibc), nothing is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import sys
import time
from collections.abc import Callable

__all__ = ["MemoryTrimmer", "TrimPolicy", "malloc_trim"]

log = logging.getLogger("falhook.receiver")
MiB = 1024 * 1024


def _find_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim  # the C library this process already uses
    except (OSError, AttributeError):  # musl and other C libraries have none
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    trim: Callable[[int], int] = fn
    return trim


# glibc's malloc_trim, or None where the C library has none. ctypes releases the GIL
# while it runs.
malloc_trim = _find_malloc_trim()


class TrimPolicy:
    """When to trim: the pure decisions, with the time passed in.

    "Held" is what large bodies took since the last trim: it rises to the most bytes
    buffered across requests at once, and by the size of each large body whose callbacks
    finished. Once it reached `threshold` and the bytes buffered fell
    back to `low` or less, a trim is wanted; it runs `settle` seconds later (what the
    requests started — storing, dispatching — lets go of its copies meanwhile), and never
    sooner than `every` seconds after the previous one.
    """

    def __init__(
        self,
        *,
        threshold: int = 4 * MiB,
        low: int = MiB,
        settle: float = 0.5,
        every: float = 5.0,
    ) -> None:
        self.threshold = threshold
        self.low = low
        self.settle = settle
        self.every = every
        self.held = 0
        self.last = -float("inf")  # when the last trim started

    def buffered(self, total: int) -> None:
        """Bytes buffered across requests now (called as they grow)."""
        if total > self.held:
            self.held = total

    def finished(self, size: int) -> None:
        """The callbacks of a delivery whose body is `size` bytes are over."""
        self.held += size

    def wanted(self, buffered: int) -> bool:
        """A trim is worth running: enough was held, and little is buffered now."""
        return self.held >= self.threshold and buffered <= self.low

    def delay(self, now: float) -> float:
        """Seconds from `now` until a wanted trim may run: after `settle`, and no sooner
        than `every` seconds after the previous one."""
        return max(self.settle, self.last + self.every - now)

    def may_run(self, now: float) -> bool:
        """The previous trim was at least `every` seconds before `now`."""
        return now >= self.last + self.every

    def trimmed(self, now: float) -> None:
        """A trim started at `now`: what was held before it no longer counts."""
        self.held = 0
        self.last = now


class MemoryTrimmer:
    """Runs `TrimPolicy` on the event loop: a timer, then ``trim(0)`` in a worker thread.

    Call `buffered` as request buffers grow, `released` when a request gives its bytes
    back, `finished` when a delivery's callbacks are over (all on the loop); `close` on
    shutdown. `trim` defaults to glibc's ``malloc_trim``; with none, every call is a no-op.
    """

    def __init__(
        self,
        policy: TrimPolicy | None = None,
        *,
        trim: Callable[[int], int] | None = malloc_trim,
        large_body: int = 256 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy or TrimPolicy()
        self.trim = trim
        self.large_body = large_body  # smaller bodies' callbacks are not worth counting
        self.clock = clock
        self.trims = 0
        self._buffered = 0
        self._timer: asyncio.TimerHandle | None = None
        self._running: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.trim is not None

    def buffered(self, total: int) -> None:
        """Bytes buffered across requests grew to `total`."""
        self._buffered = total
        self.policy.buffered(total)

    def released(self, total: int) -> None:
        """A request gave its bytes back; `total` are still buffered."""
        self._buffered = total
        if total <= self.policy.low and self.policy.held >= self.policy.threshold:
            self._schedule()

    def finished(self, size: int) -> None:
        """The callbacks of a delivery whose body is `size` bytes are over."""
        if size >= self.large_body:
            self.policy.finished(size)
            self._schedule()

    def close(self) -> None:
        """Cancel a trim not started yet (one running finishes in its thread)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        if self.trim is None or self._timer is not None or self._running is not None:
            return
        if self.policy.wanted(self._buffered):
            delay = self.policy.delay(self.clock())
            self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if not self.policy.wanted(self._buffered):
            return  # a new burst is being buffered: its last release schedules again
        now = self.clock()
        if not self.policy.may_run(now):  # a clock that lagged the loop's: wait the rest
            self._timer = asyncio.get_running_loop().call_later(
                self.policy.last + self.policy.every - now, self._fire
            )
            return
        self.policy.trimmed(now)
        self._running = asyncio.get_running_loop().create_task(
            self._run(), name="falhook-memory-trim"
        )

    async def _run(self) -> None:
        trim = self.trim
        assert trim is not None
        began = time.perf_counter()
        try:
            await asyncio.to_thread(trim, 0)
        except Exception:  # never worth more than a line: the memory is still usable
            log.exception("giving memory back to the system failed")
        else:
            self.trims += 1
            log.debug(
                "gave freed memory back to the system in %.1f ms",
                (time.perf_counter() - began) * 1000,
            )
        finally:
            self._running = None
        # Bodies let go while this ran are held again: schedule for them.
        if self.policy.held >= self.policy.threshold:
            self._schedule()
