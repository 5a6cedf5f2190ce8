"""Stage 7: every failure metric of every method on validation and test, plots, bootstrap
95% intervals of every test metric, a paired bootstrap of ConfidNet against each baseline,
and the headline (``pipeline.headline``): the DVC metrics, and the MLflow parent run's.

Segmentation (``task: segmentation``): every non-void pixel is a sample; the segmentation's
mIoU and pixel accuracy join the results, the bootstrap resamples whole images (pixels of
one image are not independent), and the curves are thinned to a readable number of points.
"""

from __future__ import annotations

# First: under DVC, starts this stage's MLflow process while the imports below run.
import pipeline.early_tracking  # noqa: F401

# isort: split
import json
from typing import Any

import numpy as np

from pipeline.artifacts import (
    HEADLINE,
    INTERVALS,
    PR_ERROR,
    RISK_COVERAGE,
    SIGNIFICANCE,
    TEST_METRICS,
    VALIDATION_METRICS,
)
from pipeline.camvid_labels import CLASSES
from pipeline.headline import headline, numbers, words
from pipeline.io import atomic_write_json, atomic_write_text, rows_csv
from pipeline.methods import CHALLENGERS, ORACLES
from pipeline.metrics import (
    GROUPED_RESOLUTION,
    METRIC_NAMES,
    SEGMENTATION_CURVE_POINTS,
    bootstrap_draws,
    failure_metrics,
    percentile_interval,
    pr_error_curve,
    risk_coverage_curve,
    segmentation_scores,
    thinned,
)
from pipeline.outputs import SEGMENTATION, load_features, load_scores, task_of
from pipeline.stage import run_stage_process
from pipeline.tracking import StageRun, evaluation_tables


def body(params: dict[str, Any], run: StageRun) -> None:
    segmentation = task_of(params) == SEGMENTATION
    scores = load_scores()
    features = {s: load_features(s) for s in ("val", "test")}
    correct = {s: f.correct for s, f in features.items()}
    results: dict[str, Any] = {}
    for split in ("val", "test"):
        results[split] = {
            "methods": {m: failure_metrics(s[split], correct[split]) for m, s in scores.items()},
            "size": int(correct[split].size),
            "errors": int((1 - correct[split]).sum()),
        }
        if segmentation:
            results[split]["segmentation"] = segmentation_scores(
                features[split].labels, features[split].predictions, len(CLASSES))
    groups = features["test"].groups if segmentation else None
    if segmentation and groups is not None:
        # Said in the results, since the intervals' width rests on it.
        results["test"]["bootstrap"] = {
            "unit": "image", "images": int(np.unique(groups).size),
            "resamples": params["evaluate"]["bootstrap_resamples"],
            "rank_bins": GROUPED_RESOLUTION}
    del features
    # Every test metric, and the validation ones for model-selection diagnostics; the
    # headline below is what `dvc exp show` compares.
    atomic_write_json(TEST_METRICS, results["test"])
    atomic_write_json(VALIDATION_METRICS, results["val"])

    # One bootstrap for everything: each resample scores every method on the same samples,
    # so the intervals and the paired differences agree with each other.
    draws = bootstrap_draws({m: s["test"] for m, s in scores.items()}, correct["test"],
                            params["evaluate"]["bootstrap_resamples"], params["seed"],
                            groups=groups)
    intervals = {m: {name: percentile_interval(d[:, j]) for j, name in enumerate(METRIC_NAMES)}
                 for m, d in draws.items()}
    atomic_write_json(INTERVALS, intervals)

    test = results["test"]["methods"]
    significance: dict[str, Any] = {}
    for challenger in CHALLENGERS:
        for baseline in scores:
            if baseline in CHALLENGERS or baseline in ORACLES:
                continue
            for metric in ("aupr_error", "aurc"):
                j = METRIC_NAMES.index(metric)
                low, high = percentile_interval(draws[challenger][:, j] - draws[baseline][:, j])
                significance.setdefault(challenger, {}).setdefault(baseline, {})[metric] = {
                    "difference": test[challenger][metric] - test[baseline][metric],
                    "ci_low": low, "ci_high": high, "significant": bool(low > 0 or high < 0),
                }
    atomic_write_json(SIGNIFICANCE, significance)

    points = SEGMENTATION_CURVE_POINTS if segmentation else None
    rc_rows, pr_rows = [], []
    for method, s in scores.items():
        curve = risk_coverage_curve(s["test"], correct["test"])
        keep = thinned(curve.coverage.size, points)
        rc_rows += [{"method": method, "coverage": c, "risk": r}
                    for c, r in zip(curve.coverage[keep], curve.risk[keep], strict=True)]
        precision, recall = pr_error_curve(s["test"], correct["test"])
        keep = thinned(precision.size, points)
        pr_rows += [{"method": method, "recall": r, "precision": p}
                    for r, p in zip(recall[keep], precision[keep], strict=True)]
    atomic_write_text(RISK_COVERAGE, rows_csv(rc_rows))
    atomic_write_text(PR_ERROR, rows_csv(pr_rows))

    values = headline(results["test"], significance)
    # Not sorted: `dvc exp show` shows the columns in the file's order.
    atomic_write_text(HEADLINE, json.dumps(values, indent=2) + "\n")
    run.log_headline(numbers(values), words(values))
    for name, table in evaluation_tables(results, intervals, significance).items():
        run.log_table(table, name)


if __name__ == "__main__":
    run_stage_process("evaluate", body, uses_torch=False)
