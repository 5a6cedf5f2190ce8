"""Failure-prediction metrics: pure functions, numpy in, floats out (fractions, not %).

Inputs are a confidence per sample (higher = more confident) and whether the frozen
classifier's prediction was correct. Errors are the positive class for AUPR-Error, the
paper's headline metric (Sec. 3.1). Conventions (see README):

- AUROC, AUPR-Success, AUPR-Error: computed here (Mann-Whitney with ties counted 1/2;
  average precision as a sum of recall steps times precision), with the definitions of
  scikit-learn's ``roc_auc_score`` and ``average_precision_score``, which the authors'
  code calls; the tests check both agree.
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

The authors' convention (valeoai/ConfidNet) is reported beside ours, labelled, so numbers
can be set beside the paper's: ``aurc_authors`` takes thresholds at the distinct scores
with a strict ``>`` (so the full-coverage point is dropped) and integrates risk against
coverage with the trapezoid rule; ``eaurc_authors`` subtracts the closed-form oracle
r + (1 - r) ln(1 - r). NaN when fewer than two distinct scores leave no curve.

Every metric comes from one sort of the scores into tie groups (``_TieGroups``), so a
bootstrap of all metrics of all methods stays cheap; tests check it against scikit-learn.

The bootstrap resamples samples, or, given ``groups``, whole groups (the images of a
segmentation: pixels of one image are not independent); see :func:`bootstrap_draws`.
:func:`segmentation_scores` gives mIoU and pixel accuracy from the confusion matrix.

Undefined values: a metric whose denominator is empty (AUROC, AUPR-*, FPR@95TPR when all
predictions are correct or all are wrong) is NaN; AURC, E-AURC, AUGRC are always defined.
Empty input, length mismatch, non-binary ``correct`` and NaN/inf confidences raise
``ValueError`` naming the problem.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

METRIC_NAMES = (
    "accuracy", "auroc", "aupr_success", "aupr_error", "fpr_at_95tpr", "aurc", "eaurc", "augrc",
    "aurc_authors", "eaurc_authors",
)
# The metrics where a lower value is better; higher is better for the others.
LOWER_IS_BETTER = frozenset({"fpr_at_95tpr", "aurc", "eaurc", "augrc", "aurc_authors",
                             "eaurc_authors"})


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


def _ranking(confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The order that sorts ``confidence`` descending (stable), and where each group of
    equal scores starts in it."""
    order = np.argsort(-confidence, kind="stable")
    return order, np.r_[0, np.flatnonzero(np.diff(confidence[order])) + 1]


@dataclass(frozen=True)
class _TieGroups:
    """Samples sorted by confidence, descending, grouped by equal score: per group the
    number of correct predictions and of errors, and the group's score."""

    correct: np.ndarray
    errors: np.ndarray
    score: np.ndarray

    @classmethod
    def of(cls, confidence: np.ndarray, correct: np.ndarray) -> _TieGroups:
        order, starts = _ranking(confidence)
        sorted_conf = confidence[order]
        ends = np.r_[starts[1:] - 1, confidence.size - 1]
        cum_correct = np.cumsum(correct[order])[ends]
        per_group_correct = np.diff(np.r_[0, cum_correct])
        per_group_total = np.diff(np.r_[0, ends + 1])
        return cls(per_group_correct, per_group_total - per_group_correct, sorted_conf[ends])


def _average_precision(positives: np.ndarray, negatives: np.ndarray) -> float:
    """scikit-learn's average precision from per-threshold counts, most confident first:
    sum over thresholds of (recall step) x precision."""
    tp, fp = np.cumsum(positives), np.cumsum(negatives)
    return float(np.sum(positives / tp[-1] * (tp / (tp + fp))))


def _metrics_from_groups(groups: _TieGroups, *, per_sample_excess: bool = True,
                         ) -> dict[str, float]:
    """Every metric from tie-group counts (integers, possibly held as floats). E-AURC is
    summed per sample (:func:`_excess_risk`), which expands the counts to one value per
    sample; ``per_sample_excess=False`` subtracts the oracle's closed form instead, for
    counts of tens of millions of pixels in each bootstrap resample."""
    n_correct, n_errors = int(groups.correct.sum()), int(groups.errors.sum())
    n = n_correct + n_errors
    accepted_correct, accepted_errors = np.cumsum(groups.correct), np.cumsum(groups.errors)
    accepted = accepted_correct + accepted_errors
    coverage, risk = accepted / n, accepted_errors / accepted
    nan = float("nan")
    out = {"accuracy": n_correct / n}
    if n_correct and n_errors:
        # Mann-Whitney: each error against the correct predictions scored above it, ties 1/2.
        above = np.r_[0, accepted_correct[:-1]]
        out["auroc"] = float(np.sum(groups.errors * (above + 0.5 * groups.correct))
                             / (n_correct * n_errors))
        out["aupr_success"] = _average_precision(groups.correct, groups.errors)
        out["aupr_error"] = _average_precision(groups.errors[::-1], groups.correct[::-1])
        tpr = accepted_correct / n_correct
        out["fpr_at_95tpr"] = float(accepted_errors[np.argmax(tpr >= 0.95)] / n_errors)
    else:
        out.update(auroc=nan, aupr_success=nan, aupr_error=nan, fpr_at_95tpr=nan)
    out["aurc"] = float(np.sum(np.diff(np.r_[0.0, coverage]) * risk))
    if per_sample_excess:
        out["eaurc"] = _excess_risk(risk, groups.correct + groups.errors, n_correct)
    else:
        out["eaurc"] = out["aurc"] - _oracle_aurc_closed_form(n_correct, n)
    out["augrc"] = float(np.trapezoid(np.r_[0.0, accepted_errors / n], np.r_[0.0, coverage]))
    # Authors' convention: strict '>' at each distinct score drops the full-coverage point.
    if coverage.size >= 3:
        out["aurc_authors"] = float(np.trapezoid(risk[:-1], coverage[:-1]))
    elif coverage.size == 2:
        out["aurc_authors"] = 0.0  # a single point has no area under sklearn's auc
    else:
        out["aurc_authors"] = nan
    error_rate = n_errors / n
    oracle = error_rate + (1 - error_rate) * np.log1p(-error_rate) if error_rate < 1 else 1.0
    out["eaurc_authors"] = out["aurc_authors"] - float(oracle)
    return out


# Counts (resamples x tie groups, or x samples) processed at once by the vectorised
# bootstrap: bounds the memory of its temporaries (a few dozen arrays of this many floats).
_BATCH = 2**20


def _metrics_from_counts(right: np.ndarray, wrong: np.ndarray, *,
                         per_sample_excess: bool = True) -> np.ndarray:
    """:func:`_metrics_from_groups` for many resamples at once: ``right`` and ``wrong``
    ``(resamples, T)`` hold, per resample, the correct predictions and errors of each tie
    group of a common ranking (most confident first); a group that a resample does not
    draw holds 0 and 0, and is left out as the per-resample computation leaves it out.
    Returns ``(resamples, len(METRIC_NAMES))``, columns in :data:`METRIC_NAMES` order, equal
    to :func:`_metrics_from_groups` on each row's drawn groups up to rounding (tests: 1e-12).

    Empty groups change no count but cannot be divided by (``accepted`` is 0 before the
    first drawn group): ratios are taken only where defined, and empty groups weigh 0.
    Counts are integers (held as floats, exact below 2**53), so sums taken from either end
    are exact: two cumulative sums serve every metric. Rows are taken :data:`_BATCH`
    counts at a time, which bounds the memory of the temporaries."""
    right = np.asarray(right, dtype=np.float64)
    wrong = np.asarray(wrong, dtype=np.float64)
    rows = right.shape[0]
    step = max(1, _BATCH // max(right.shape[1], 1))
    if rows > step:
        return np.concatenate([
            _metrics_from_counts(right[i:i + step], wrong[i:i + step],
                                 per_sample_excess=per_sample_excess)
            for i in range(0, rows, step)])
    size = right + wrong
    drawn = size > 0
    n_correct, n_errors = right.sum(axis=1), wrong.sum(axis=1)
    n = n_correct + n_errors
    accepted_correct = np.cumsum(right, axis=1)
    accepted_errors = np.cumsum(wrong, axis=1)
    accepted = accepted_correct + accepted_errors
    coverage = accepted / n[:, None]
    risk = _ratio(accepted_errors, accepted)
    out = np.full((rows, len(METRIC_NAMES)), np.nan)
    column = {name: j for j, name in enumerate(METRIC_NAMES)}
    out[:, column["accuracy"]] = n_correct / n

    both = (n_correct > 0) & (n_errors > 0)
    if both.any():
        pick = slice(None) if both.all() else both  # a copy only when some row is undefined
        c, e, ac, ae = right[pick], wrong[pick], accepted_correct[pick], accepted_errors[pick]
        nc, ne = n_correct[pick][:, None], n_errors[pick][:, None]
        # Mann-Whitney: each error against the correct predictions scored above it, ties 1/2.
        out[pick, column["auroc"]] = np.sum(e * ((ac - c) + 0.5 * c), axis=1) / (nc * ne)[:, 0]
        out[pick, column["aupr_success"]] = _average_precisions(c, nc, ac, ae)
        # Errors flagged from the least confident end: counts from there on, exactly.
        out[pick, column["aupr_error"]] = _average_precisions(e, ne, ne - ae + e, nc - ac + c)
        first = np.argmax(ac / nc >= 0.95, axis=1)
        out[pick, column["fpr_at_95tpr"]] = ae[np.arange(first.size), first] / ne[:, 0]

    step = np.diff(coverage, axis=1, prepend=0.0)
    out[:, column["aurc"]] = np.sum(np.where(drawn, step * risk, 0.0), axis=1)
    if per_sample_excess:
        out[:, column["eaurc"]] = _excess_risks(risk, size, n_correct)
    else:
        out[:, column["eaurc"]] = out[:, column["aurc"]] - _oracle_aurc_closed_form(n_correct, n)
    generalised = np.concatenate([np.zeros((rows, 1)), accepted_errors / n[:, None]], axis=1)
    padded_coverage = np.concatenate([np.zeros((rows, 1)), coverage], axis=1)
    out[:, column["augrc"]] = np.trapezoid(generalised, padded_coverage, axis=1)

    # Authors' convention: the trapezoid over the drawn groups but the last. A drawn
    # group's segment starts at the previous drawn group, whose coverage and risk an empty
    # group in between repeats (cumulative counts), so the segments kept are those of drawn
    # groups with a drawn group before them and one after.
    inside = drawn & (accepted > size) & (accepted < n[:, None])
    previous_risk = np.concatenate([risk[:, :1], risk[:, :-1]], axis=1)
    authors = np.sum(np.where(inside, step * (risk + previous_risk) / 2.0, 0.0), axis=1)
    authors[drawn.sum(axis=1) == 1] = np.nan  # one point: no curve
    out[:, column["aurc_authors"]] = authors
    error_rate = n_errors / n
    rate = np.where(error_rate < 1, error_rate, 0.0)  # log1p(-1) is never taken
    oracle = np.where(error_rate < 1, rate + (1 - rate) * np.log1p(-rate), 1.0)
    out[:, column["eaurc_authors"]] = authors - oracle
    return out


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator`` where the denominator is positive, NaN elsewhere."""
    out = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def _average_precisions(positives: np.ndarray, total: np.ndarray, tp: np.ndarray,
                        fp: np.ndarray) -> np.ndarray:
    """:func:`_average_precision` of each row, from the positives per group, their
    ``total`` ``(rows, 1)`` and the counts ``tp``, ``fp`` at each group's threshold; empty
    groups (no positive) add nothing."""
    terms = positives / total * _ratio(tp, tp + fp)
    return np.sum(np.where(positives > 0, terms, 0.0), axis=1)


def _excess_risks(risk: np.ndarray, group_sizes: np.ndarray, n_correct: np.ndarray,
                  ) -> np.ndarray:
    """:func:`_excess_risk` of each row, term by term as it is (so never negative); every
    row holds the same number of samples."""
    rows, n = risk.shape[0], int(group_sizes[0].sum())
    per_sample = np.repeat(np.where(group_sizes > 0, risk, 0.0).ravel(),
                           group_sizes.ravel().astype(np.int64)).reshape(rows, n)
    accepted = np.arange(1, n + 1)
    oracle = np.maximum(accepted - n_correct[:, None], 0) / accepted
    return np.sum(per_sample - oracle, axis=1) / n


def _oracle_risk(n_correct: int, n: int) -> np.ndarray:
    """The oracle's selective risk after accepting k = 1..n samples: max(0, k - c) / k."""
    accepted = np.arange(1, n + 1)
    return np.maximum(accepted - n_correct, 0) / accepted


def _oracle_aurc(n_correct: int, n: int) -> float:
    return float(np.sum(_oracle_risk(n_correct, n)) / n)


def _oracle_aurc_closed_form(n_correct: Any, n: Any) -> Any:
    """:func:`_oracle_aurc` without the per-sample sum: (1/n) sum_{k=c+1}^{n} (k - c) / k
    = ((n - c) - c (H_n - H_c)) / n, with harmonic numbers H from the digamma function.
    Numbers in, a float out; arrays in, an array out."""
    from scipy.special import digamma

    harmonic_gap = digamma(np.add(n, 1)) - digamma(np.add(n_correct, 1))
    if np.ndim(harmonic_gap) == 0:
        harmonic_gap = float(harmonic_gap)
    return ((n - n_correct) - n_correct * harmonic_gap) / n


def _excess_risk(risk: np.ndarray, group_sizes: np.ndarray, n_correct: int) -> float:
    """E-AURC (Geifman et al., 2019): AURC minus the oracle's AURC, summed per sample as
    (risk of the ranking) - (risk of the oracle) at the same coverage.

    Subtracting two separately rounded sums left a perfect ranking at about -1e-17
    (printed "-0.00"). Term by term the difference is >= 0 in floating point too: each
    sample's risk is its tie group's errors / accepted, at least max(0, k - c) / k in
    exact arithmetic, and both are single correctly rounded divisions of integers, which
    rounding cannot reorder. So E-AURC is never negative, and exactly 0 for a ranking with
    every correct prediction above every error and no tied errors.
    """
    n = int(group_sizes.sum())
    per_sample = np.repeat(risk, group_sizes) - _oracle_risk(n_correct, n)
    return float(np.sum(per_sample) / n)


@dataclass(frozen=True)
class RiskCoverage:
    """One point per distinct confidence value, most confident first."""

    coverage: np.ndarray
    risk: np.ndarray
    generalised_risk: np.ndarray
    threshold: np.ndarray


def risk_coverage_curve(confidence: np.ndarray, correct: np.ndarray) -> RiskCoverage:
    confidence, correct = check_inputs(confidence, correct)
    groups = _TieGroups.of(confidence, correct)
    errors = np.cumsum(groups.errors)
    accepted = np.cumsum(groups.correct + groups.errors)
    return RiskCoverage(
        coverage=accepted / confidence.size,
        risk=errors / accepted,
        generalised_risk=errors / confidence.size,
        threshold=groups.score,
    )


def failure_metrics(confidence: np.ndarray, correct: np.ndarray) -> dict[str, float]:
    """Every failure-prediction metric for one scoring method (fractions, not percent)."""
    confidence, correct = check_inputs(confidence, correct)
    return _metrics_from_groups(_TieGroups.of(confidence, correct))


def _one(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    def metric(confidence: np.ndarray, correct: np.ndarray) -> float:
        return failure_metrics(confidence, correct)[name]

    metric.__name__ = name
    metric.__doc__ = f"``failure_metrics(...)['{name}']``."
    return metric


aurc = _one("aurc")
eaurc = _one("eaurc")
augrc = _one("augrc")
fpr_at_95tpr = _one("fpr_at_95tpr")
aupr_error = _one("aupr_error")  # the model-selection criterion


def oracle_aurc(correct: np.ndarray) -> float:
    """AURC of the best possible ranking: every correct prediction first, then the errors
    one at a time (distinct scores, so no tie group hides the rising risk)."""
    correct = np.asarray(correct).reshape(-1)
    return _oracle_aurc(int(correct.sum()), correct.size)


# A segmentation's curves have a point per distinct score among millions of pixels; the
# plots keep this many per method (evenly spaced in rank), the ends included.
SEGMENTATION_CURVE_POINTS = 1000


def thinned(size: int, points: int | None) -> np.ndarray:
    """Indices of at most ``points`` of ``size`` curve points, evenly spaced, first and last
    kept; all of them when ``points`` is None."""
    if points is None or size <= points:
        return np.arange(size)
    return np.unique(np.linspace(0, size - 1, points).round().astype(np.int64))


def pr_error_curve(confidence: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Precision and recall of flagging errors by low confidence, one point per distinct
    score, in scikit-learn's ``precision_recall_curve`` order: recall falling to a final
    (recall 0, precision 1) point."""
    confidence, correct = check_inputs(confidence, correct)
    groups = _TieGroups.of(confidence, correct)
    flagged_errors = np.cumsum(groups.errors[::-1])
    flagged = np.cumsum((groups.errors + groups.correct)[::-1])
    total_errors = max(int(flagged_errors[-1]), 1)
    precision = np.r_[1.0, flagged_errors / flagged][::-1]
    recall = np.r_[0.0, flagged_errors / total_errors][::-1]
    return precision, recall


# Rank bins of the grouped bootstrap: each resample's metrics are computed at this many
# points of the full sample's ranking (exact when there are no more distinct scores).
GROUPED_RESOLUTION = 2**16
# Resamples scored per matrix product in the grouped bootstrap (bounds its memory).
_GROUPED_BATCH = 64


def bootstrap_draws(scores: Mapping[str, np.ndarray], correct: np.ndarray, resamples: int,
                    seed: int, groups: np.ndarray | None = None,
                    resolution: int = GROUPED_RESOLUTION) -> dict[str, np.ndarray]:
    """Every metric of every method on the same ``resamples`` resamples of the samples
    (drawn with replacement): ``{method: array (resamples, len(METRIC_NAMES))}``, NaN where
    a metric is undefined on a resample (no error drawn). Sharing the draws makes the
    per-method intervals and the paired differences come from one bootstrap.

    With ``groups`` (an integer per sample, say the image of each pixel), each resample
    draws whole groups with replacement (as many as there are groups) and keeps every
    sample of each drawn group, as often as the group is drawn: the cluster bootstrap,
    for samples that are not independent within a group (the pixels of one image). See
    :func:`_grouped_draws` for how this stays cheap at tens of millions of pixels."""
    if groups is not None:
        return _grouped_draws(scores, correct, groups, resamples, seed, resolution)
    checked = {m: check_inputs(conf, correct)[0] for m, conf in scores.items()}
    _, correct = check_inputs(next(iter(checked.values())), correct)
    return _sample_draws(checked, correct, resamples, seed)


def sample_resample_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of ``n`` samples is drawn in each of ``resamples`` resamples,
    ``(resamples, n)``: per resample, ``n`` indices drawn with replacement by one
    ``rng.integers(0, n, n)`` call (one call per resample, so the draws are those of
    materialising each resample as ``samples[rng.integers(0, n, n)]``)."""
    drawn = np.stack([rng.integers(0, n, n) for _ in range(resamples)]) if resamples else \
        np.empty((0, n), dtype=np.int64)
    offsets = (np.arange(resamples) * n)[:, None]
    return np.bincount((drawn + offsets).ravel(), minlength=resamples * n).reshape(resamples, n)


def _sample_draws(scores: Mapping[str, np.ndarray], correct: np.ndarray, resamples: int,
                  seed: int) -> dict[str, np.ndarray]:
    """The sample bootstrap of :func:`bootstrap_draws`, all resamples of a batch at once.

    A resample that draws sample i w_i times ranks the drawn samples as the full sample
    does, each w_i times, with the full sample's ties: its tie groups are the full
    sample's with counts sum_{i in t} w_i (correct, errors), the undrawn groups empty. So
    one sort per method, then per batch of resamples a gather and a segmented sum of the
    counts ``(batch, n)``, and every metric from those counts for the whole batch
    (:func:`_metrics_from_counts`): the same values as scoring each materialised resample
    with :func:`failure_metrics` (tests: to 1e-12), from the same draws, at a small
    fraction of the cost (no sort per resample and method, no Python loop over them)."""
    n = correct.size
    rng = np.random.default_rng(seed)
    ranked = {}
    for method, conf in scores.items():
        order, starts = _ranking(conf)
        ranked[method] = (order, starts, correct[order])
    rows: dict[str, list[np.ndarray]] = {m: [] for m in scores}
    batch = max(1, _BATCH // n)
    for start in range(0, resamples, batch):
        counts = sample_resample_counts(n, min(batch, resamples - start), rng)
        for method, (order, starts, right_sorted) in ranked.items():
            drawn = counts[:, order]
            right = np.add.reduceat(drawn * right_sorted, starts, axis=1)
            total = np.add.reduceat(drawn, starts, axis=1)
            rows[method].append(_metrics_from_counts(right, total - right))
    return {m: np.concatenate(r) if r else np.empty((0, len(METRIC_NAMES)))
            for m, r in rows.items()}


def group_resample_counts(n_groups: int, resamples: int, seed: int) -> np.ndarray:
    """How often each group is drawn in each resample, ``(resamples, n_groups)``: a draw of
    ``n_groups`` groups with replacement is a multinomial count vector."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=resamples)


def _compact_groups(groups: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """Validate ``groups`` and number the groups that hold a sample 0..G-1."""
    groups = np.asarray(groups).reshape(-1)
    if groups.size != n:
        raise ValueError(f"groups has {groups.size} samples but correct has {n}")
    if not np.issubdtype(groups.dtype, np.integer):
        raise ValueError(f"groups must hold integers (a group id per sample), got {groups.dtype}")
    if groups.size and groups.min() < 0:
        raise ValueError(f"groups must be non-negative, got {int(groups.min())}")
    present = np.bincount(groups) > 0
    number = np.cumsum(present) - 1
    return number[groups], int(present.sum())


@dataclass(frozen=True)
class _RankBins:
    """Per group, the correct predictions and errors in each rank bin of the full sample's
    ranking (descending confidence), ``(groups, bins)`` each. Bins follow the tie groups:
    one bin per distinct score when there are at most ``resolution`` of them, else each tie
    group goes whole into bin ``floor(resolution * first rank / N)``, so a bin never splits
    tied scores and holds about N / resolution samples."""

    correct: np.ndarray
    errors: np.ndarray

    @classmethod
    def of(cls, confidence: np.ndarray, correct: np.ndarray, group: np.ndarray,
           n_groups: int, resolution: int) -> _RankBins:
        n = confidence.size
        # Any order within a tie group does: the whole group lands in one bin.
        order = np.argsort(-confidence)
        sorted_conf = confidence[order]
        new_tie = np.r_[False, sorted_conf[1:] != sorted_conf[:-1]]
        del sorted_conf
        tie = np.cumsum(new_tie)
        if int(tie[-1]) + 1 <= resolution:
            bins, n_bins = tie, int(tie[-1]) + 1
        else:
            first_rank = np.flatnonzero(np.r_[True, new_tie[1:]])
            bins, n_bins = (first_rank * resolution // n)[tie], resolution
        del new_tie, tie
        key = group[order].astype(np.int64) * n_bins + bins
        del bins
        total = np.bincount(key, minlength=n_groups * n_bins)
        right = np.bincount(key[correct[order] == 1], minlength=n_groups * n_bins)
        shape = (n_groups, n_bins)
        return cls(right.reshape(shape).astype(np.float64),
                   (total - right).reshape(shape).astype(np.float64))

    def metrics(self, counts: np.ndarray) -> np.ndarray:
        """Every metric, one row per resample, for groups drawn ``counts`` times
        ``(resamples, groups)``; bins that no drawn group fills are left out."""
        weights = counts.astype(np.float64)
        return _metrics_from_counts(weights @ self.correct, weights @ self.errors,
                                    per_sample_excess=False)


def _grouped_draws(scores: Mapping[str, np.ndarray], correct: np.ndarray, groups: np.ndarray,
                   resamples: int, seed: int, resolution: int) -> dict[str, np.ndarray]:
    """The cluster bootstrap of :func:`bootstrap_draws`, without materialising a resample.

    A resample that draws group g w_g times holds each of g's samples w_g times; its
    ranking is the full sample's ranking with those multiplicities, so every metric
    follows from the per-tie-group counts sum_g w_g n_g(t). Those are a product of the
    draw counts ``(resamples, G)`` with the per-group counts ``(G, bins)`` of
    :class:`_RankBins`, computed once per method (one sort); each resample then costs
    O(G x bins), not O(N). With at most ``resolution`` distinct scores the draws are
    exactly those of a materialised resample; beyond, each metric is taken at
    ``resolution`` points of the ranking (bins of about N / resolution samples, ties
    never split). E-AURC subtracts the oracle's closed form (:func:`_oracle_aurc_closed_form`).

    Cost: one argsort and a few passes over the N samples per method, then
    2 x resamples x G x bins multiply-adds (BLAS) and the metrics of the resulting
    ``(resamples, bins)`` counts, a batch of rows at a time (:func:`_metrics_from_counts`);
    memory: a handful of N-long arrays and two G x bins matrices, one
    method at a time. Measured at CamVid's test size (233 images, 40.3M pixels, 1,000
    resamples, one thread; ``benchmarks/grouped_bootstrap.py``), before the metrics of the
    resamples were vectorised: 31 s of CPU per method, about 6 s of it the resamples;
    1.4 GiB above the inputs at peak (not measured again since).
    """
    if resolution < 1:
        raise ValueError(f"resolution must be a positive number of rank bins, got {resolution}")
    first = next(iter(scores.values()))
    _, correct = check_inputs(first, correct)
    group, n_groups = _compact_groups(groups, correct.size)
    counts = group_resample_counts(n_groups, resamples, seed)
    draws = {}
    for method, conf in scores.items():
        checked, _ = check_inputs(conf, correct)
        binned = _RankBins.of(checked, correct, group, n_groups, resolution)
        del checked
        rows = [binned.metrics(counts[start:start + _GROUPED_BATCH])
                for start in range(0, resamples, _GROUPED_BATCH)]
        draws[method] = np.concatenate(rows) if rows else \
            np.empty((0, len(METRIC_NAMES)))
        del binned  # before the next method's are built: one method's bins at a time
    return draws


def percentile_interval(values: np.ndarray) -> tuple[float, float]:
    """95% percentile interval of the finite values; NaN bounds if there are none."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def bootstrap_intervals(
    confidence: np.ndarray, correct: np.ndarray, resamples: int, seed: int,
    groups: np.ndarray | None = None,
) -> dict[str, tuple[float, float]]:
    """95% percentile interval of every metric of one method (see :func:`bootstrap_draws`;
    ``groups`` resamples whole groups)."""
    draws = bootstrap_draws({"method": confidence}, correct, resamples, seed,
                            groups)["method"]
    return {name: percentile_interval(draws[:, j]) for j, name in enumerate(METRIC_NAMES)}


def paired_bootstrap(
    confidence_a: np.ndarray,
    confidence_b: np.ndarray,
    correct: np.ndarray,
    metric: str,
    resamples: int,
    seed: int,
    groups: np.ndarray | None = None,
) -> tuple[float, float, float]:
    """Observed ``metric(a) - metric(b)`` and the 95% percentile interval of the difference
    over resamples drawn for both methods at once (resamples where it is undefined are
    dropped; ``groups`` resamples whole groups, see :func:`bootstrap_draws`). ``metric``
    is one of :data:`METRIC_NAMES`."""
    if metric not in METRIC_NAMES:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRIC_NAMES)}")
    j = METRIC_NAMES.index(metric)
    draws = bootstrap_draws({"a": confidence_a, "b": confidence_b}, correct, resamples, seed,
                            groups)
    observed = failure_metrics(confidence_a, correct)[metric] - failure_metrics(
        confidence_b, correct)[metric]
    low, high = percentile_interval(draws["a"][:, j] - draws["b"][:, j])
    return float(observed), low, high


def seed_paired_bootstrap(
    confidence_a: Sequence[np.ndarray],
    confidence_b: Sequence[np.ndarray],
    correct: Sequence[np.ndarray],
    metrics: Sequence[str],
    resamples: int,
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Paired bootstrap of ``metric(a) - metric(b)`` over several runs (seeds) at once.

    Run ``i`` contributes ``confidence_a[i]``, ``confidence_b[i]`` and ``correct[i]``
    (its own classifier's test predictions). Each resample redraws every run's test
    samples with replacement *within that run*, scores both methods on the same draw, and
    averages the per-run differences, so the statistic is the mean over seeds of the
    difference, and the interval carries both the test-set noise of every seed and the
    pairing of the two methods. Returns ``{metric: {"mean_diff", "ci": [low, high],
    "per_seed": [...]}}``; resamples where a metric is undefined (no error drawn) are
    dropped. With one run, the draws are those of :func:`paired_bootstrap`.
    """
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; valid: {', '.join(METRIC_NAMES)}")
    if not (len(confidence_a) == len(confidence_b) == len(correct)) or not correct:
        raise ValueError("need the same number (>= 1) of runs for a, b and correct, got "
                         f"{len(confidence_a)}, {len(confidence_b)}, {len(correct)}")
    columns = [METRIC_NAMES.index(m) for m in metrics]
    diffs = np.zeros((resamples, len(metrics)))
    per_seed = []
    rng = np.random.default_rng(seed)
    runs = []
    for a, b, c in zip(confidence_a, confidence_b, correct, strict=True):
        a, c = check_inputs(a, c)
        b, _ = check_inputs(b, c)
        runs.append((a, b, c))
        observed_a, observed_b = failure_metrics(a, c), failure_metrics(b, c)
        per_seed.append([observed_a[m] - observed_b[m] for m in metrics])
    for i in range(resamples):
        for a, b, c in runs:
            idx = rng.integers(0, c.size, c.size)
            values_a = _metrics_from_groups(_TieGroups.of(a[idx], c[idx]))
            values_b = _metrics_from_groups(_TieGroups.of(b[idx], c[idx]))
            diffs[i] += [values_a[METRIC_NAMES[j]] - values_b[METRIC_NAMES[j]]
                         for j in columns]
    diffs /= len(runs)
    observed = np.mean(per_seed, axis=0)
    out: dict[str, dict[str, Any]] = {}
    for k, metric in enumerate(metrics):
        low, high = percentile_interval(diffs[:, k])
        out[metric] = {"mean_diff": float(observed[k]), "ci": [low, high],
                       "per_seed": [float(row[k]) for row in per_seed]}
    return out


def comparison(metric: str, low: float, high: float) -> str:
    """'better', 'worse' or 'n.s.' for method A, from the 95% interval ``[low, high]`` of
    ``metric(A) - metric(B)``: a side is taken only when the interval excludes zero, and
    which side is better depends on whether ``metric`` is in :data:`LOWER_IS_BETTER`;
    'n/a' when the interval is undefined (NaN: no resample had both outcomes)."""
    if metric not in METRIC_NAMES:
        raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRIC_NAMES)}")
    if math.isnan(low) or math.isnan(high):
        return "n/a"
    if low > 0 or high < 0:
        return "better" if (low > 0) != (metric in LOWER_IS_BETTER) else "worse"
    return "n.s."


def segmentation_scores(labels: np.ndarray, predictions: np.ndarray,
                        num_classes: int) -> dict[str, Any]:
    """The segmentation's own quality, from the confusion matrix of every labelled pixel
    (void pixels already left out), as SegNet reports it (Badrinarayanan et al., TPAMI
    2017, Sec. 4: global accuracy, class average accuracy, mIoU) and the paper's CamVid
    setting inherits:

    - ``pixel_accuracy``: correct pixels / labelled pixels (SegNet's global accuracy);
    - ``class_accuracy``: the mean over classes of each class's recall;
    - ``per_class_iou``: TP / (TP + FP + FN) per class, None for a class that is neither
      in the labels nor in the predictions (no pixel to score);
    - ``miou``: the mean of the defined per-class IoUs (a class absent from both is
      ignored, the usual convention, not counted as 0 or 1).

    One confusion matrix accumulated over all pixels of the split, not a mean of
    per-image scores. Fractions, not percent.
    """
    labels = np.asarray(labels).reshape(-1)
    predictions = np.asarray(predictions).reshape(-1)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels has {labels.size} pixels but predictions has "
                         f"{predictions.size}")
    if labels.size == 0:
        raise ValueError("segmentation scores need at least one labelled pixel; got none")
    for name, values in (("labels", labels), ("predictions", predictions)):
        low, high = int(values.min()), int(values.max())
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(f"{name} holds class {bad}; valid classes: 0..{num_classes - 1} "
                             "(void pixels must be left out)")
    confusion = np.bincount(labels.astype(np.int64) * num_classes + predictions,
                            minlength=num_classes**2).reshape(num_classes, num_classes)
    true_positive = np.diag(confusion).astype(np.float64)
    in_labels, in_predictions = confusion.sum(axis=1), confusion.sum(axis=0)
    union = in_labels + in_predictions - true_positive
    iou = [float(tp / u) if u > 0 else None for tp, u in zip(true_positive, union, strict=True)]
    recall = true_positive[in_labels > 0] / in_labels[in_labels > 0]
    return {
        "pixel_accuracy": float(true_positive.sum() / labels.size),
        "class_accuracy": float(recall.mean()),
        "miou": float(np.mean([v for v in iou if v is not None])),
        "per_class_iou": iou,
        "pixels": int(labels.size),
    }
