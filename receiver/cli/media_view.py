"""How the CLI reads and shows a delivery's archived files (``falhook media``, and
``deliveries show``): the media rows of a store, a file as JSON, a file as table cells."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # SQLAlchemy and the archive are imported only when a command runs
    from falhook.receiver.archive import MediaItem, MediaRows

__all__ = ["item_document", "media_cells", "media_rows"]


@contextlib.contextmanager
def media_rows(url: str) -> Iterator[MediaRows]:
    """The media rows of the store at `url` (its schema checked already)."""
    from falhook.receiver.archive import MediaRows
    from falhook.receiver.store.engine import make_engine

    engine = make_engine(url)
    try:
        yield MediaRows(engine)
    finally:
        engine.dispose()


def item_document(item: MediaItem, request_id: str | None = None) -> dict[str, Any]:
    """A file as ``--json`` prints it (``request_id`` first when given)."""
    document = {"request_id": request_id} if request_id is not None else {}
    return document | {**asdict(item), "state": str(item.state)}


def media_cells(
    items: list[tuple[str, MediaItem]], *, with_request: bool = True
) -> list[list[str]]:
    """Files as table rows (header first): where each came from and where it is kept."""
    header = ["REQUEST_ID"] if with_request else []
    rows = [[*header, "POINTER", "STATE", "SIZE", "STORED_URL / ERROR"]]
    for request_id, item in items:
        where = item.stored_url or item.error or "-"
        size = "-" if item.size is None else str(item.size)
        first = [request_id] if with_request else []
        rows.append([*first, item.pointer, str(item.state), size, where])
    return rows
