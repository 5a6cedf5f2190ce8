"""Stage 7: every failure metric of every method on validation and test, plots, bootstrap
95% intervals of every test metric, a paired bootstrap of ConfidNet against each baseline,
and the headline (``pipeline.headline``): the DVC metrics, and the MLflow parent run's."""

from __future__ import annotations

import json
from typing import Any

from pipeline.artifacts import (
    HEADLINE,
    INTERVALS,
    PR_ERROR,
    RISK_COVERAGE,
    SIGNIFICANCE,
    TEST_METRICS,
    VALIDATION_METRICS,
)
from pipeline.headline import headline, numbers, words
from pipeline.io import atomic_write_json, atomic_write_text, rows_csv
from pipeline.methods import CHALLENGERS, ORACLES
from pipeline.metrics import (
    METRIC_NAMES,
    bootstrap_draws,
    failure_metrics,
    percentile_interval,
    pr_error_curve,
    risk_coverage_curve,
)
from pipeline.outputs import load_features, load_scores
from pipeline.stage import run_stage
from pipeline.tracking import StageRun, evaluation_tables


def body(params: dict[str, Any], run: StageRun) -> None:
    scores = load_scores()
    correct = {s: load_features(s).correct for s in ("val", "test")}
    results: dict[str, Any] = {}
    for split in ("val", "test"):
        results[split] = {
            "methods": {m: failure_metrics(s[split], correct[split]) for m, s in scores.items()},
            "size": int(correct[split].size),
            "errors": int((1 - correct[split]).sum()),
        }
    # Every test metric, and the validation ones for model-selection diagnostics; the
    # headline below is what `dvc exp show` compares.
    atomic_write_json(TEST_METRICS, results["test"])
    atomic_write_json(VALIDATION_METRICS, results["val"])

    # One bootstrap for everything: each resample scores every method on the same samples,
    # so the intervals and the paired differences agree with each other.
    draws = bootstrap_draws({m: s["test"] for m, s in scores.items()}, correct["test"],
                            params["evaluate"]["bootstrap_resamples"], params["seed"])
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

    rc_rows, pr_rows = [], []
    for method, s in scores.items():
        curve = risk_coverage_curve(s["test"], correct["test"])
        rc_rows += [{"method": method, "coverage": c, "risk": r}
                    for c, r in zip(curve.coverage, curve.risk, strict=True)]
        precision, recall = pr_error_curve(s["test"], correct["test"])
        pr_rows += [{"method": method, "recall": r, "precision": p}
                    for r, p in zip(recall, precision, strict=True)]
    atomic_write_text(RISK_COVERAGE, rows_csv(rc_rows))
    atomic_write_text(PR_ERROR, rows_csv(pr_rows))

    values = headline(results["test"], significance)
    # Not sorted: `dvc exp show` shows the columns in the file's order.
    atomic_write_text(HEADLINE, json.dumps(values, indent=2) + "\n")
    run.log_headline(numbers(values), words(values))
    for name, table in evaluation_tables(results, intervals, significance).items():
        run.log_table(table, name)


if __name__ == "__main__":
    run_stage("evaluate", body)
