"""The benchmarks' result tables, printed as Markdown (what the README shows)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import astuple, is_dataclass


def _cell(value: object) -> str:
    """A `met` column's True/False/None prints as yes/NO/blank; anything else as its text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)


def print_table(headers: Sequence[str], rows: Iterable[object]) -> None:
    """Rows are tuples or dataclasses with one field per header; columns are padded to their widest cell."""
    table = [list(headers), *[[_cell(v) for v in (astuple(r) if is_dataclass(r) else r)] for r in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(headers))]
    print()
    print("| " + " | ".join(h.ljust(w) for h, w in zip(table[0], widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in table[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |")
