"""Where archived files go: a folder or object storage, through obstore.

obstore puts a stream as a multipart upload (S3, GCS, Azure: completed only once the
whole stream was read; aborted when it raises) or, in a folder, into a staging file
renamed onto the key at the end — so no partial object is ever visible at a final key.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from falhook.receiver.errors import ArchiveError, MediaFailure

if TYPE_CHECKING:
    from obstore.store import ClientConfig, ObjectStore

__all__ = ["Target"]

_PART_BYTES = 8 * 1024 * 1024  # multipart part size: memory held per upload is a few parts
_PARTS_AT_ONCE = 2


class Target:
    """The archive named by FALHOOK_ARCHIVE_URL: ``put`` a stream at a key, and name it.

    Credentials, region and endpoint of object storage come from each cloud's standard
    environment (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``…); an ``http://`` endpoint
    (a local S3 server) is allowed.
    """

    def __init__(self, url: str) -> None:
        from obstore.store import LocalStore, from_url

        scheme, sep, rest = url.partition("://")
        self.url = url
        self.local = not sep or scheme == "file"
        self._store: ObjectStore
        if self.local:
            folder = Path(rest if sep else url).expanduser().resolve()
            folder.mkdir(parents=True, exist_ok=True)
            self._base = folder.as_uri()
            self._store = LocalStore(prefix=folder)
        else:
            self._base = url.rstrip("/")
            options: ClientConfig = {}
            endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT")
            if scheme == "s3" and endpoint and endpoint.startswith("http://"):
                options["allow_http"] = True
            try:
                self._store = from_url(url, client_options=options or None)
            except Exception as exc:  # obstore's configuration errors
                raise ArchiveError(
                    MediaFailure.STORAGE, f"cannot open the archive {url}: {exc}"
                ) from exc

    def stored_url(self, key: str) -> str:
        """The object's URL in the archive's own scheme (``file:///…``, ``s3://bucket/key``)."""
        return f"{self._base}/{key}"

    def key_of(self, stored_url: str) -> str | None:
        """The key of an object this archive named `stored_url` (None if not one of its)."""
        prefix = self._base + "/"
        return stored_url[len(prefix) :] if stored_url.startswith(prefix) else None

    def path(self, key: str) -> Path | None:
        """The file of `key` in a folder archive (None for object storage)."""
        if not self.local:
            return None
        return Path(self._base.removeprefix("file://")) / key

    async def put(self, key: str, chunks: AsyncIterable[bytes], content_type: str | None) -> None:
        """Write the whole stream at `key`, or nothing: raises what the stream raises, or
        ArchiveError (storage) when the archive refuses the write."""
        import obstore

        attributes: dict[str, str] | None = None
        if content_type and not self.local:  # a folder keeps no attributes: the row does
            attributes = {"Content-Type": content_type}
        try:
            await obstore.put_async(
                self._store,
                key,
                chunks,
                attributes=attributes,
                chunk_size=_PART_BYTES,
                max_concurrency=_PARTS_AT_ONCE,
            )
        except Exception as exc:  # the caller looks first at what its own stream raised
            raise ArchiveError(
                MediaFailure.STORAGE, f"the archive did not take {key}: {exc}"
            ) from exc

    async def read(self, key: str) -> tuple[AsyncIterator[bytes], int]:
        """The object's bytes as a stream, and its size (the console's thumbnails)."""
        import obstore

        try:
            result = await obstore.get_async(self._store, key)
        except Exception as exc:
            raise ArchiveError(MediaFailure.STORAGE, f"cannot read {key}: {exc}") from exc
        stream: AsyncIterator[bytes] = result.stream()
        return stream, int(result.meta["size"])
