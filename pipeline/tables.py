"""Markdown tables, the one way every report, summary and table of this project lays them
out (GitHub's pipe tables, through ``tabulate``)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tabulate import tabulate


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table, columns padded to their widest cell, no
    trailing newline. Cells are written as given (``str``): numbers are formatted by the
    caller, never reparsed, so "50.00" stays "50.00" and "n/a" stays "n/a"."""
    body = [[str(cell) for cell in row] for row in rows]
    for row in body:
        if len(row) != len(headers):
            raise ValueError(f"a row of {len(row)} cells under {len(headers)} headers: {row}")
    return tabulate(body, headers=list(headers), tablefmt="github", disable_numparse=True)
