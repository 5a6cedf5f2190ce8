"""The headline: the few numbers that answer "did ConfidNet beat the baselines here", in
``metrics/headline.json`` (the pipeline's only DVC metrics file, so ``dvc exp show`` and
``dvc metrics diff`` compare these) and on the MLflow parent run of each pipeline
execution, under the same names.

Names are ``test/<what>/<metric>``, the split first:

- ``test/<method>/<metric>`` for ConfidNet, MCP (the paper's baseline) and TrustScore, with
  ``aupr_err`` (AUPR-Error, the paper's headline, Sec. 3.1), ``auroc``, ``fpr95`` (FPR at
  95% TPR) and ``aurc`` (risk-coverage, Fig. 3). ``confidnet`` is the pipeline's final
  ConfidNet, the fine-tuned one (the paper's full learning scheme, Sec. 2.2); it equals
  phase 1 when fine-tuning keeps epoch 0.
- ``test/vs_mcp/aupr_err``: ConfidNet minus MCP on AUPR-Error (positive: ConfidNet finds
  errors better), with its 95% paired-bootstrap interval (``ci_low``, ``ci_high``) and
  ``verdict``, a word: ``better`` (the interval is above 0), ``worse`` (below), ``n.s.``
  (it holds 0), ``n/a`` (undefined).
- ``test/accuracy`` and ``test/errors``: the classifier's, which every number rests on.
- ``test/miou``, for a segmentation only: the segmentation's mean IoU (its
  ``test/accuracy`` and ``test/errors`` count labelled pixels).

Values are fractions, as in every other metrics file; the word is a string (DVC shows it as
a column; MLflow keeps it as a tag of the same name, its metrics being numbers only). The
names are short so that a few of them, with each experiment's name and changed params, fit
a 160-column ``dvc exp show`` (the README's commands).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pipeline.metrics import comparison

SPLIT = "test"
# headline name -> the method's key in metrics/evaluate.json
METHODS = {"confidnet": "confidnet_finetuned", "mcp": "mcp", "trustscore": "trustscore"}
# headline name -> the metric's key in pipeline.metrics.METRIC_NAMES
METRICS = {"aupr_err": "aupr_error", "auroc": "auroc", "fpr95": "fpr_at_95tpr",
           "aurc": "aurc"}
# ConfidNet minus this baseline, on this metric (metrics/significance.json)
CHALLENGER, BASELINE, COMPARED = "confidnet", "mcp", "aupr_err"
COMPARISON = f"{SPLIT}/vs_{BASELINE}"
VERDICT = f"{COMPARISON}/verdict"
WORDS = ("better", "worse", "n.s.", "n/a")


def headline(test: Mapping[str, Any], significance: Mapping[str, Any]) -> dict[str, Any]:
    """The headline of one pipeline run, from ``test`` (metrics/evaluate.json: ``methods``,
    ``size``, ``errors``) and ``significance`` (metrics/significance.json). Keys in display
    order: AUPR-Error of each method and the comparison first (``dvc exp show`` keeps the
    file's order), then the other metrics, then the classifier."""
    methods = test["methods"]
    paired = significance[METHODS[CHALLENGER]][METHODS[BASELINE]][METRICS[COMPARED]]
    out: dict[str, Any] = {}
    for short, key in METRICS.items():
        for name, method in METHODS.items():
            out[f"{SPLIT}/{name}/{short}"] = float(methods[method][key])
        if short == COMPARED:
            out[f"{COMPARISON}/{COMPARED}"] = float(paired["difference"])
            out[f"{COMPARISON}/ci_low"] = float(paired["ci_low"])
            out[f"{COMPARISON}/ci_high"] = float(paired["ci_high"])
            out[VERDICT] = comparison(METRICS[COMPARED], paired["ci_low"], paired["ci_high"])
    out[f"{SPLIT}/accuracy"] = float(methods[METHODS[BASELINE]]["accuracy"])
    out[f"{SPLIT}/errors"] = int(test["errors"])
    if "segmentation" in test:
        out[f"{SPLIT}/miou"] = float(test["segmentation"]["miou"])
    return out


def numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a headline (MLflow metrics)."""
    return {k: float(v) for k, v in values.items() if not isinstance(v, str)}


def words(values: Mapping[str, Any]) -> dict[str, str]:
    """The word entries of a headline (MLflow tags)."""
    return {k: v for k, v in values.items() if isinstance(v, str)}
