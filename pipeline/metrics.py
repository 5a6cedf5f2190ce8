"""Failure-prediction metrics: pure functions, numpy in, floats out (fractions, not %).

Inputs are a confidence per sample (higher = more confident) and whether the frozen
classifier's prediction was correct. Errors are the positive class for AUPR-Error, the
paper's headline metric (Sec. 3.1). Conventions (see ``shared/reference`` and README):

- AUROC, AUPR-Success, AUPR-Error: scikit-learn's ``roc_auc_score`` and
  ``average_precision_score``, as in the authors' code.
- FPR at 95% TPR: TPR counts *correct* predictions accepted. Over the exact ROC curve
  (every distinct score a threshold), the FPR of the first operating point whose
  TPR >= 0.95, i.e. the strictest threshold that keeps 95% of the correct predictions.
  Always defined when both outcomes occur (TPR reaches 1 at the lowest threshold).
- Risk-coverage: samples sorted by confidence, descending; *tied scores enter together*,
  so each distinct score is one point (coverage = accepted / N, risk = errors among
  accepted / accepted).
- AURC: sum over those points of (coverage step) x risk; without ties this is the mean
  selective risk (1/N) sum_k risk(k) of Geifman & El-Yaniv.
- E-AURC: AURC minus the AURC of the oracle ranking (all correct predictions before all
  errors, each at its own score); it tends to r + (1 - r) ln(1 - r) for large N.
- AUGRC (Traub et al. 2024): trapezoid area under generalised risk (errors among
  accepted / N) against coverage, from (0, 0). Equals
  (1 - AUROC) acc (1 - acc) + (1 - acc)^2 / 2 exactly.

Undefined values: a metric whose denominator is empty (AUROC, AUPR-*, FPR@95TPR when all
predictions are correct or all are wrong) is NaN; AURC, E-AURC, AUGRC are always defined.
Empty input, length mismatch, non-binary ``correct`` and NaN/inf confidences raise
``ValueError`` naming the problem.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

METRIC_NAMES = (
    "accuracy", "auroc", "aupr_success", "aupr_error", "fpr_at_95tpr", "aurc", "eaurc", "augrc",
)


def check_inputs(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert; raise ``ValueError`` naming the problem."""
    confidence = np.asarray(confidence, dtype=np.float64).reshape(-1)
    correct_arr = np.asarray(correct).reshape(-1)
    if confidence.size == 0:
        raise ValueError("failure metrics need at least one sample; got an empty array")
    if confidence.shape != correct_arr.shape:
        raise ValueError(
            f"confidence has {confidence.size} samples but correct has {correct_arr.size}"
        )
    if not np.all(np.isfinite(confidence)):
        bad = int(np.sum(~np.isfinite(confidence)))
        raise ValueError(f"confidence has {bad} NaN or infinite value(s)")
    if not np.all((correct_arr == 0) | (correct_arr == 1)):
        raise ValueError("correct must hold only 0/1 or False/True values")
    return confidence, correct_arr.astype(np.int64)


@dataclass(frozen=True)
class RiskCoverage:
    """One point per distinct confidence value, most confident first."""

    coverage: np.ndarray
    risk: np.ndarray
    generalised_risk: np.ndarray
    threshold: np.ndarray


def risk_coverage_curve(confidence: np.ndarray, correct: np.ndarray) -> RiskCoverage:
    confidence, correct = check_inputs(confidence, correct)
    n = confidence.size
    order = np.argsort(-confidence, kind="stable")
    sorted_conf = confidence[order]
    errors = np.cumsum(1 - correct[order])
    group_ends = np.r_[np.flatnonzero(np.diff(sorted_conf)), n - 1]
    accepted = group_ends + 1
    return RiskCoverage(
        coverage=accepted / n,
        risk=errors[group_ends] / accepted,
        generalised_risk=errors[group_ends] / n,
        threshold=sorted_conf[group_ends],
    )


def aurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    curve = risk_coverage_curve(confidence, correct)
    steps = np.diff(np.r_[0.0, curve.coverage])
    return float(np.sum(steps * curve.risk))


def oracle_aurc(correct: np.ndarray) -> float:
    """AURC of the best possible ranking: every correct prediction first, then the errors
    one at a time (distinct scores, so no tie group hides the rising risk)."""
    correct = np.asarray(correct).reshape(-1)
    n, n_correct = correct.size, int(correct.sum())
    accepted = np.arange(n_correct + 1, n + 1)
    return float(np.sum((accepted - n_correct) / accepted) / n)


def eaurc(confidence: np.ndarray, correct: np.ndarray) -> float:
    confidence, correct = check_inputs(confidence, correct)
    return aurc(confidence, correct) - oracle_aurc(correct)


def augrc(confidence: np.ndarray, correct: np.ndarray) -> float:
    curve = risk_coverage_curve(confidence, correct)
    return float(np.trapezoid(np.r_[0.0, curve.generalised_risk], np.r_[0.0, curve.coverage]))


def fpr_at_95tpr(confidence: np.ndarray, correct: np.ndarray) -> float:
    confidence, correct = check_inputs(confidence, correct)
    if correct.min() == correct.max():
        return float("nan")
    fpr, tpr, _ = roc_curve(correct, confidence, drop_intermediate=False)
    return float(fpr[np.argmax(tpr >= 0.95)])


def failure_metrics(confidence: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    """Every failure-prediction metric for one scoring method (fractions, not percent)."""
    confidence, correct = check_inputs(confidence, correct)
    both = correct.min() != correct.max()
    nan = float("nan")
    return {
        "accuracy": float(correct.mean()),
        "auroc": float(roc_auc_score(correct, confidence)) if both else nan,
        "aupr_success": float(average_precision_score(correct, confidence)) if both else nan,
        "aupr_error": float(average_precision_score(1 - correct, -confidence)) if both else nan,
        "fpr_at_95tpr": fpr_at_95tpr(confidence, correct),
        "aurc": aurc(confidence, correct),
        "eaurc": eaurc(confidence, correct),
        "augrc": augrc(confidence, correct),
    }


def aupr_error(confidence: np.ndarray, correct: np.ndarray) -> float:
    """AUPR-Error alone (the model-selection criterion); NaN without both outcomes."""
    confidence, correct = check_inputs(confidence, correct)
    if correct.min() == correct.max():
        return float("nan")
    return float(average_precision_score(1 - correct, -confidence))


def pr_error_curve(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of detecting errors by low confidence."""
    confidence, correct = check_inputs(confidence, correct)
    precision, recall, _ = precision_recall_curve(1 - correct, -confidence)
    return precision, recall


MetricFn = Callable[[np.ndarray, np.ndarray], float]


def paired_bootstrap(
    confidence_a: np.ndarray,
    confidence_b: np.ndarray,
    correct: np.ndarray,
    metric: MetricFn,
    resamples: int,
    seed: int,
) -> tuple[float, float, float]:
    """Observed ``metric(a) - metric(b)`` and its 95% percentile interval from resampling
    test samples with replacement (the same indices for both methods).

    Resamples where the metric is undefined (no error drawn) are dropped.
    """
    confidence_a, correct = check_inputs(confidence_a, correct)
    confidence_b, _ = check_inputs(confidence_b, correct)
    rng = np.random.default_rng(seed)
    n = correct.size
    observed = metric(confidence_a, correct) - metric(confidence_b, correct)
    diffs = np.empty(resamples)
    for i in range(resamples):
        idx = rng.integers(0, n, n)
        diffs[i] = metric(confidence_a[idx], correct[idx]) - metric(confidence_b[idx], correct[idx])
    diffs = diffs[np.isfinite(diffs)]
    if diffs.size == 0:
        return observed, float("nan"), float("nan")
    low, high = np.percentile(diffs, [2.5, 97.5])
    return float(observed), float(low), float(high)
