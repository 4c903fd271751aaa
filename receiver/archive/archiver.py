"""The archiver: a delivery's files, into the archive, before its callbacks run.

The dispatcher calls it in a delivery's attempt, after the delivery was acknowledged and
while its lease is renewed. Each file is recorded first (pending), then downloaded, up to
FALHOOK_ARCHIVE_CONCURRENCY at once; transient failures are tried again with backoff
within the file's deadline. A file already archived (a duplicate, a retry, a replay) is
never fetched again. A file that cannot be had for good is recorded failed or skipped and
the callbacks still run; one still failing for a transient reason fails the attempt, to
be retried like a failed callback — and on the delivery's last attempt it is recorded
failed so that the callbacks run all the same.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import httpx

from falhook.receiver.archive.fetch import Archived, archive_file
from falhook.receiver.archive.hosts import HostRule
from falhook.receiver.archive.media import MediaItem, MediaState
from falhook.receiver.archive.purge import Purger
from falhook.receiver.archive.rows import MediaRows
from falhook.receiver.archive.target import Target
from falhook.receiver.archive.urls import FoundUrl, find_urls, object_key
from falhook.receiver.errors import ArchiveError, MediaFailure
from falhook.receiver.models import Delivery
from falhook.receiver.retry import Backoff
from falhook.receiver.settings import Settings

if TYPE_CHECKING:
    from falhook.receiver.tracing.spans import Tracing

__all__ = ["Archiver", "FileObserver"]

log = logging.getLogger("falhook.archive")

# (outcome: archived/failed/skipped/retry, or purged/purge_failed; bytes archived)
FileObserver = Callable[[str, int], None]


class Archiver:
    """Archives the files of OK deliveries to FALHOOK_ARCHIVE_URL."""

    def __init__(
        self,
        settings: Settings,
        rows: MediaRows,
        *,
        observe: FileObserver | None = None,
        on_failed: Callable[[str, str], None] | None = None,
        first_backoff: float = 0.5,
        rule: HostRule | None = None,
    ) -> None:
        if settings.archive_url is None:
            raise ValueError("the archive is off (FALHOOK_ARCHIVE_URL is not set)")
        self.rows = rows
        self.rule = rule or HostRule(settings.archive_hosts)
        self.target = Target(settings.archive_url)
        self.max_bytes = settings.archive_max_bytes
        self.timeout = settings.archive_timeout_seconds
        self._observe = observe or (lambda outcome, size: None)
        self._on_failed = on_failed  # (source URL, error) of a file recorded failed
        self.tracing: Tracing | None = None  # set by the receiver when tracing is on
        self._first_backoff = first_backoff
        self._slots = asyncio.Semaphore(settings.archive_concurrency)
        # Our own client: no proxy or netrc from the environment (the host rule checks the
        # address connected to), a bounded wait for each step, no deadline for a whole
        # body (a large file takes as long as it takes, within the file's deadline).
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(30.0, connect=10.0),
            trust_env=False,
            follow_redirects=False,
            limits=httpx.Limits(max_connections=settings.archive_concurrency * 2),
        )
        self.purger: Purger | None = None
        if settings.fal_purge and settings.purge_key is not None:
            self.purger = Purger(
                settings.platform_url, settings.purge_key, self._client, first_backoff=first_backoff
            )

    async def aclose(self) -> None:
        await self._client.aclose()

    async def __call__(self, claim: Any, delivery: Delivery, last_attempt: bool) -> Delivery:
        """The dispatcher's step before the callbacks: `delivery` with its `media`."""
        if not delivery.ok or delivery.payload is None:
            return delivery
        return await self.archive(delivery, last_attempt=last_attempt)

    async def archive(self, delivery: Delivery, *, last_attempt: bool = False) -> Delivery:
        """Archive every file of `delivery` not archived yet; it, with its `media`.

        Raises ArchiveError when a file failed for a transient reason (the attempt is to
        be retried), unless `last_attempt`: then that file is recorded failed.
        """
        found = find_urls(delivery.payload)
        request_id = delivery.request_id
        if not found:
            await self._purge(request_id, ())
            return delivery
        known = await self.rows.ensure(request_id, [(f.pointer, f.url) for f in found])
        todo = [f for f in found if known[f.pointer].state is MediaState.PENDING]
        if todo:
            results = await asyncio.gather(
                *(self._file(request_id, f, last_attempt) for f in todo), return_exceptions=True
            )
            errors = [r for r in results if isinstance(r, BaseException)]
            for error in errors:
                if not isinstance(error, ArchiveError):
                    raise error
            if errors:
                raise ArchiveError(
                    MediaFailure.UNAVAILABLE,
                    f"{len(errors)} of {len(found)} files not archived yet: {errors[0]}",
                )
        items = tuple(await self.rows.items(request_id))
        await self._purge(request_id, items)
        return dataclasses.replace(delivery, media=items)

    async def _purge(self, request_id: str, items: tuple[MediaItem, ...]) -> None:
        """Delete fal's copy (FALHOOK_FAL_PURGE) once, and only when every file is archived."""
        if self.purger is None or any(i.state is not MediaState.ARCHIVED for i in items):
            return
        if await self.rows.purge_state(request_id) == "purged":
            return
        done, status, error = await self.purger.purge(request_id)
        state = "purged" if done else "failed"
        await self.rows.record_purge(request_id, state, status_code=status, error=error)
        self._observe("purged" if done else "purge_failed", 0)

    async def _file(self, request_id: str, found: FoundUrl, last_attempt: bool) -> None:
        try:
            self.rule.check(found.url)
        except ArchiveError as exc:
            await self.rows.record(
                request_id, found.pointer, MediaState.SKIPPED, tries=0, error=str(exc)
            )
            self._observe("skipped", 0)
            return
        async with self._slots:
            await self._download(request_id, found, last_attempt)

    async def _download(self, request_id: str, found: FoundUrl, last_attempt: bool) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        backoff = Backoff(self._first_backoff, 30.0)
        key = object_key("", request_id, found)
        tries = 0
        while True:
            tries += 1
            try:
                async with asyncio.timeout_at(deadline):
                    archived = await self.download(found, key)
            except TimeoutError:
                error = ArchiveError(
                    MediaFailure.UNAVAILABLE,
                    f"unavailable: not archived within {self.timeout:g} s "
                    "(FALHOOK_ARCHIVE_TIMEOUT_SECONDS)",
                )
            except ArchiveError as exc:
                error = exc
            else:
                await self._archived(request_id, found, key, archived, tries)
                return
            if not error.failure.transient:
                state = (
                    MediaState.SKIPPED
                    if error.failure is MediaFailure.HOST_REFUSED
                    else MediaState.FAILED
                )
                await self.rows.record(
                    request_id, found.pointer, state, tries=tries, error=str(error)
                )
                self._observe(state.value, 0)
                log.warning("media %s of %s %s: %s", found.pointer, request_id, state, error)
                if state is MediaState.FAILED and self._on_failed is not None:
                    self._on_failed(found.url, str(error))
                return
            pause = backoff.failed()
            if loop.time() + pause >= deadline:
                state = MediaState.FAILED if last_attempt else MediaState.PENDING
                await self.rows.record(
                    request_id, found.pointer, state, tries=tries, error=str(error)
                )
                self._observe("failed" if last_attempt else "retry", 0)
                if last_attempt:
                    log.warning("media %s of %s failed: %s", found.pointer, request_id, error)
                    if self._on_failed is not None:
                        self._on_failed(found.url, str(error))
                    return
                raise error
            await asyncio.sleep(pause)

    async def download(self, found: FoundUrl, key: str) -> Archived:
        """One try at one file; with tracing on, a CLIENT span (`GET` and the file's URL,
        without user info or query)."""
        if self.tracing is None:
            return await self._try_once(found, key)
        with self.tracing.calling("GET", found.url) as call:
            archived = await self._try_once(found, key)
            call.answered(200)  # archive_file returns only once a 2xx was read whole
            return archived

    async def _try_once(self, found: FoundUrl, key: str) -> Archived:
        return await archive_file(
            self._client,
            self.rule,
            self.target,
            found.url,
            key,
            max_bytes=self.max_bytes,
            content_type=found.content_type,
        )

    async def _archived(
        self, request_id: str, found: FoundUrl, key: str, archived: Archived, tries: int
    ) -> None:
        await self.rows.record(
            request_id,
            found.pointer,
            MediaState.ARCHIVED,
            tries=tries,
            stored_url=self.target.stored_url(key),
            sha256=archived.sha256,
            size=archived.size,
            content_type=archived.content_type,
        )
        self._observe("archived", archived.size)
