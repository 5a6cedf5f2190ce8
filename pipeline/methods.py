"""Names and roles of the scoring methods, for tables and comparisons."""

from __future__ import annotations

from collections.abc import Sequence

# Display order and names of the methods in every table.
METHOD_LABELS: dict[str, str] = {
    "mcp": "MCP (baseline)",
    "mcp_temperature": "MCP, temperature-scaled",
    "entropy": "Entropy",
    "max_logit": "Max logit",
    "energy": "Energy",
    "doctor": "DOCTOR",
    "mc_dropout": "MC Dropout",
    "mc_dropout_mutual_information": "MC Dropout, mutual information",
    "trustscore": "TrustScore",
    "confidnet": "ConfidNet, phase 1",
    "confidnet_finetuned": "ConfidNet, fine-tuned",
    "tcp_oracle": "TCP oracle (uses labels)",
}
# ConfidNet's two phases are compared against every other method except the oracles.
CHALLENGERS = ("confidnet", "confidnet_finetuned")
ORACLES = ("tcp_oracle",)
# The methods of the paper's Table 1 and Fig. 3, which the report's figures show.
PAPER_METHODS = ("mcp", "mc_dropout", "trustscore", "confidnet", "confidnet_finetuned",
                 "tcp_oracle")


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def ordered_methods(methods: Sequence[str]) -> list[str]:
    """Known methods in display order, then unknown ones alphabetically, oracles last."""
    known = [m for m in METHOD_LABELS if m in methods and m not in ORACLES]
    extra = sorted(m for m in methods if m not in METHOD_LABELS)
    return known + extra + [m for m in ORACLES if m in methods]
