"""One download of one file, streamed from its origin into the archive.

`archive_file` is the whole of one try: resolve and check the host, GET (following
redirects only to allowed hosts, each hop checked again), stream the body into the
archive while counting and hashing it. Never a whole file in memory; over the size cap
the upload is abandoned and nothing is kept. Retries are the caller's (archiver.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urljoin

import httpx

from falhook.receiver.archive.hosts import HostRule
from falhook.receiver.archive.target import Target
from falhook.receiver.errors import ArchiveError, MediaFailure

__all__ = ["Archived", "archive_file"]

_MAX_REDIRECTS = 5
_TRANSIENT_STATUS = frozenset({408, 425, 429})


@dataclass(frozen=True, slots=True)
class Archived:
    """A file now whole in the archive."""

    sha256: str
    size: int
    content_type: str | None


class _Body:
    """The response body as the archive reads it: counted, hashed, capped. What went wrong
    while reading is kept (`error`): the storage library reports it as its own failure."""

    def __init__(self, response: httpx.Response, max_bytes: int, url: str) -> None:
        self.response = response
        self.max_bytes = max_bytes
        self.url = url
        self.size = 0
        self.hash = hashlib.sha256()
        self.error: ArchiveError | None = None

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.response.aiter_bytes():
                self.size += len(chunk)
                if self.size > self.max_bytes:
                    raise ArchiveError(
                        MediaFailure.TOO_LARGE,
                        f"too_large: over {self.max_bytes} bytes (FALHOOK_ARCHIVE_MAX_BYTES)",
                    )
                self.hash.update(chunk)
                yield chunk
        except ArchiveError as exc:
            self.error = exc
            raise
        except httpx.HTTPError as exc:
            self.error = ArchiveError(
                MediaFailure.UNAVAILABLE, f"unavailable: download broke off: {exc!r}"
            )
            raise self.error from exc


async def _open(client: httpx.AsyncClient, rule: HostRule, url: str) -> httpx.Response:
    """The origin's streamed answer for `url`, after the allowed redirects."""
    current = url
    for _ in range(_MAX_REDIRECTS + 1):
        resolved = await rule.resolve(current)
        extensions = {"sni_hostname": resolved.host} if resolved.scheme == "https" else {}
        request = client.build_request(
            "GET",
            resolved.url_for(current),
            headers={"Host": resolved.host_header},
            extensions=extensions,
        )
        try:
            response = await client.send(request, stream=True, follow_redirects=False)
        except httpx.HTTPError as exc:
            raise ArchiveError(
                MediaFailure.UNAVAILABLE, f"unavailable: {type(exc).__name__}: {exc}"
            ) from exc
        location = response.headers.get("location")
        if not (response.is_redirect and location):
            return response
        await response.aclose()
        current = urljoin(current, location)
    raise ArchiveError(MediaFailure.REFUSED, f"refused: more than {_MAX_REDIRECTS} redirects")


def _check_status(response: httpx.Response) -> None:
    status = response.status_code
    if status == 200:
        return
    if status in (404, 410):
        raise ArchiveError(MediaFailure.NOT_FOUND, f"not_found: the origin answered {status}")
    if status >= 500 or status in _TRANSIENT_STATUS:
        raise ArchiveError(MediaFailure.UNAVAILABLE, f"unavailable: the origin answered {status}")
    raise ArchiveError(MediaFailure.REFUSED, f"refused: the origin answered {status}")


async def archive_file(
    client: httpx.AsyncClient,
    rule: HostRule,
    target: Target,
    url: str,
    key: str,
    *,
    max_bytes: int,
    content_type: str | None = None,
) -> Archived:
    """Download `url` into the archive at `key` (one try). ArchiveError says why not;
    its `failure.transient` says whether another try may do better."""
    response = await _open(client, rule, url)
    try:
        _check_status(response)
        length = response.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_bytes:
            raise ArchiveError(
                MediaFailure.TOO_LARGE,
                f"too_large: {length} bytes, over {max_bytes} (FALHOOK_ARCHIVE_MAX_BYTES)",
            )
        kind = response.headers.get("content-type") or content_type
        body = _Body(response, max_bytes, url)
        try:
            await target.put(key, body, kind)
        except ArchiveError:
            if body.error is not None:
                raise body.error from None
            raise
        if body.error is not None:  # raised inside the library, yet reported as written
            raise body.error
        return Archived(body.hash.hexdigest(), body.size, kind)
    finally:
        await response.aclose()
