"""``pipeline.tables``: the one markdown table layout of the reports."""

from __future__ import annotations

import pytest
from conftest import table_rows

from pipeline.tables import markdown_table


def test_markdown_table_keeps_cells_as_given() -> None:
    text = markdown_table(["Method", "AUROC", "n"], [["MCP", "50.00", 7], ["TCP", "n/a", "—"]])
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1  # padded to one width
    assert set(lines[1]) == {"|", "-"}
    assert table_rows(text) == [["Method", "AUROC", "n"], ["MCP", "50.00", "7"],
                                ["TCP", "n/a", "—"]]
    with pytest.raises(ValueError, match="2 cells under 3 headers"):
        markdown_table(["a", "b", "c"], [["x", "y"]])
