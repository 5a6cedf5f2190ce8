"""Small text helpers shared by the stages; the report itself lives in ``pipeline.report``."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping, Sequence
from typing import Any

# Display order and names of the methods in every table.
METHOD_LABELS: dict[str, str] = {
    "mcp": "MCP (baseline)",
    "mc_dropout": "MC Dropout",
    "trustscore": "TrustScore",
    "confidnet": "ConfidNet, phase 1",
    "confidnet_finetuned": "ConfidNet, fine-tuned",
    "tcp_oracle": "TCP oracle (uses labels)",
}
CHALLENGERS = ("confidnet", "confidnet_finetuned")
ORACLES = ("tcp_oracle",)


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def ordered_methods(methods: Sequence[str]) -> list[str]:
    known = [m for m in METHOD_LABELS if m in methods and m not in ORACLES]
    extra = sorted(m for m in methods if m not in METHOD_LABELS)
    return known + extra + [m for m in ORACLES if m in methods]


def rows_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def history_csv(history: Sequence[Mapping[str, float]]) -> str:
    """Per-epoch curves; rows may lack keys (epoch 0 has no training loss)."""
    fields: list[str] = []
    for row in history:
        fields += [k for k in row if k not in fields]
    return rows_csv([{k: row.get(k, "") for k in fields} for row in history])
