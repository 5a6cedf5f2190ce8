"""The headline (metrics/headline.json, the one DVC metrics file): its exact keys, at most
25 numbers, and the better / worse / n.s. word."""

from __future__ import annotations

import math
from typing import Any

import pytest

from pipeline.headline import headline, numbers, words
from pipeline.metrics import METRIC_NAMES

KEYS = [
    "test/confidnet/aupr_err", "test/mcp/aupr_err", "test/trustscore/aupr_err",
    "test/vs_mcp/aupr_err", "test/vs_mcp/ci_low", "test/vs_mcp/ci_high",
    "test/vs_mcp/verdict",
    "test/confidnet/auroc", "test/mcp/auroc", "test/trustscore/auroc",
    "test/confidnet/fpr95", "test/mcp/fpr95", "test/trustscore/fpr95",
    "test/confidnet/aurc", "test/mcp/aurc", "test/trustscore/aurc",
    "test/accuracy", "test/errors",
]


def outputs(low: float, high: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """metrics/evaluate.json and metrics/significance.json as the evaluate stage writes
    them, each method's metrics distinct."""
    methods = ("mcp", "trustscore", "entropy", "confidnet", "confidnet_finetuned", "tcp_oracle")
    test = {"methods": {m: {k: 0.01 * i + 0.001 * j for j, k in enumerate(METRIC_NAMES)}
                        for i, m in enumerate(methods)},
            "size": 540, "errors": 20}
    for values in test["methods"].values():
        values["accuracy"] = 520 / 540
    paired = {"difference": 0.04, "ci_low": low, "ci_high": high, "significant": True}
    significance = {c: {b: {"aupr_error": paired, "aurc": paired}
                        for b in ("mcp", "trustscore", "entropy")}
                    for c in ("confidnet", "confidnet_finetuned")}
    return test, significance


def test_headline_has_its_keys_in_order_and_at_most_25_numbers() -> None:
    test, significance = outputs(0.01, 0.07)
    values = headline(test, significance)
    assert list(values) == KEYS
    assert len(numbers(values)) == 17 <= 25
    assert words(values) == {"test/vs_mcp/verdict": "better"}
    final = test["methods"]["confidnet_finetuned"]  # ConfidNet: the fine-tuned one
    assert values["test/confidnet/aupr_err"] == final["aupr_error"]
    assert values["test/confidnet/fpr95"] == final["fpr_at_95tpr"]
    assert values["test/trustscore/aurc"] == test["methods"]["trustscore"]["aurc"]
    assert values["test/vs_mcp/aupr_err"] == 0.04
    assert (values["test/vs_mcp/ci_low"], values["test/vs_mcp/ci_high"]) == (
        0.01, 0.07)
    assert values["test/accuracy"] == 520 / 540 and values["test/errors"] == 20
    assert isinstance(values["test/errors"], int)


@pytest.mark.parametrize(("low", "high", "word"), [
    (0.01, 0.07, "better"), (-0.07, -0.01, "worse"), (-0.01, 0.07, "n.s."),
    (0.0, 0.07, "n.s."), (math.nan, math.nan, "n/a"),
])
def test_verdict_says_which_way_the_interval_lies(low: float, high: float, word: str) -> None:
    test, significance = outputs(low, high)
    assert headline(test, significance)["test/vs_mcp/verdict"] == word
