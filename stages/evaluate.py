"""Stage 7: every failure metric of every method on validation and test, DVC metrics and
plots, bootstrap 95% intervals of every test metric, and a paired bootstrap of ConfidNet
against each baseline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import BASELINE_SCORES, CONFIDNET_SCORES, FINETUNED_SCORES, METRICS, PLOTS
from pipeline.features import load_features
from pipeline.io import atomic_write_json, atomic_write_text, load_npz, rows_csv
from pipeline.methods import CHALLENGERS, ORACLES
from pipeline.metrics import (
    aupr_error,
    aurc,
    bootstrap_intervals,
    failure_metrics,
    paired_bootstrap,
    pr_error_curve,
    risk_coverage_curve,
)
from pipeline.stage import run_stage
from pipeline.tracking import StageRun


def load_scores() -> dict[str, dict[str, np.ndarray]]:
    files = [*sorted(Path(BASELINE_SCORES).glob("*.npz")), CONFIDNET_SCORES, FINETUNED_SCORES]
    return {path.stem: load_npz(path) for path in files}


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
    # Test metrics are the DVC metrics that `dvc exp show` compares; validation ones are
    # kept beside them for model-selection diagnostics.
    atomic_write_json(METRICS / "evaluate.json", results["test"])
    atomic_write_json(METRICS / "validation.json", results["val"])

    resamples = params["evaluate"]["bootstrap_resamples"]
    intervals = {m: bootstrap_intervals(s["test"], correct["test"], resamples, params["seed"])
                 for m, s in scores.items()}
    atomic_write_json(METRICS / "intervals.json", intervals)

    significance: dict[str, Any] = {}
    for challenger in CHALLENGERS:
        for baseline in scores:
            if baseline in CHALLENGERS or baseline in ORACLES:
                continue
            for metric_name, metric in (("aupr_error", aupr_error), ("aurc", aurc)):
                diff, low, high = paired_bootstrap(
                    scores[challenger]["test"], scores[baseline]["test"], correct["test"],
                    metric, resamples, params["seed"])
                significance.setdefault(challenger, {}).setdefault(baseline, {})[metric_name] = {
                    "difference": diff, "ci_low": low, "ci_high": high,
                    "significant": bool(low > 0 or high < 0),
                }
    atomic_write_json(METRICS / "significance.json", significance)

    rc_rows, pr_rows = [], []
    for method, s in scores.items():
        curve = risk_coverage_curve(s["test"], correct["test"])
        rc_rows += [{"method": method, "coverage": c, "risk": r}
                    for c, r in zip(curve.coverage, curve.risk, strict=True)]
        precision, recall = pr_error_curve(s["test"], correct["test"])
        pr_rows += [{"method": method, "recall": r, "precision": p}
                    for r, p in zip(recall, precision, strict=True)]
    atomic_write_text(PLOTS / "risk_coverage.csv", rows_csv(rc_rows))
    atomic_write_text(PLOTS / "pr_error.csv", rows_csv(pr_rows))

    run.log_metrics({f"{split}/{method}/{name}": value
                     for split in ("val", "test")
                     for method, values in results[split]["methods"].items()
                     for name, value in values.items()})
    run.log_metrics({f"test/{method}/{name}_ci_{side}": bound
                     for method, values in intervals.items()
                     for name, bounds in values.items()
                     for side, bound in zip(("low", "high"), bounds, strict=True)})
    run.log_metrics({f"{split}/{key}": results[split][key]
                     for split in ("val", "test") for key in ("size", "errors")})
    run.log_artifact(METRICS / "evaluate.json")
    run.log_artifact(METRICS / "significance.json")
    run.log_artifact(METRICS / "intervals.json")


if __name__ == "__main__":
    run_stage("evaluate", body)
