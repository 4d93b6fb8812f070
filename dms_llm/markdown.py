"""Markdown tables: every table dms_llm writes (results, model cards, the benchmark report) goes through
here, so a cell holding a `|` or a line break cannot split its row."""

from __future__ import annotations


def table_row(cells) -> str:
    return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"


def table(header, rows=()) -> list[str]:
    """The lines of a table: header, separator, one line per row (cells are turned into text by `str`)."""
    return [table_row(header), "|" + "---|" * len(header)] + [table_row(r) for r in rows]
