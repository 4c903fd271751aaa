"""Plain-text tables for people: the CLI's listings and the demo's summary."""

from __future__ import annotations

__all__ = ["render_table"]


def render_table(rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )
