"""Stage 8: ``reports/report.md`` with its figures, readable on its own.

The report is a function of the stage outputs and ``params.yaml`` only: no MLflow run id,
git commit, path or time, so the same inputs give the same bytes and a rerun leaves
``dvc.lock`` unchanged. Where the runs are is said by name (the MLflow experiment of
``tracking.experiment``), not by id.
"""

from __future__ import annotations

from typing import Any

import yaml

from pipeline.artifacts import (
    CLASSIFIER_METRICS,
    CONFIDNET_METRICS,
    DATA,
    FIGURES,
    FINETUNE_METRICS,
    INTERVALS,
    REPORT,
    SIGNIFICANCE,
    TEST_METRICS,
    VALIDATION_METRICS,
)
from pipeline.io import atomic_write_text, read_json
from pipeline.outputs import load_features, load_scores
from pipeline.report import (
    FINAL,
    PHASE1,
    beside_paper_table,
    merged_confidnet,
    method_labels,
    paired_table,
    paper_rows,
    paper_table,
    render_report,
    results_table,
    save_figures,
    verdict,
)
from pipeline.stage import run_stage
from pipeline.tracking import StageRun


def render(params: dict[str, Any]) -> str:
    evaluation = read_json(TEST_METRICS)
    validation = read_json(VALIDATION_METRICS)
    intervals = read_json(INTERVALS)
    significance = read_json(SIGNIFICANCE)
    classifier = read_json(CLASSIFIER_METRICS)
    confidnet = read_json(CONFIDNET_METRICS)
    finetune = read_json(FINETUNE_METRICS)
    split = read_json(DATA / "split.json")
    test, test_errors = evaluation["methods"], evaluation["errors"]
    scores = load_scores()
    merged = merged_confidnet(scores[PHASE1], scores[FINAL], finetune["best_epoch"])
    labels = method_labels(list(test), merged)
    test_features = load_features("test")
    figures = save_figures(FIGURES, scores, test_features.correct,
                           scores["tcp_oracle"]["test"], labels)

    paper = paper_table(params["setting"])
    if paper is None:
        shown = None
    elif paper[0] == params["setting"]:
        shown = {"same_setting": True, "row": paper[1],
                 "table": beside_paper_table(test, paper[1], labels)}
    else:
        shown = {"same_setting": False, "row": paper[1], "table": paper_rows(paper[1])}
    return render_report({
        "params": params, "params_yaml": yaml.safe_dump(params, sort_keys=False).rstrip(),
        "verdict": verdict(test, significance, test_errors, labels),
        "evaluation": evaluation, "test": test, "validation": validation, "split": split,
        "classifier": classifier, "confidnet": confidnet, "finetune": finetune,
        "merged": merged, "final_label": labels[FINAL],
        "results_table": results_table(test, intervals, labels), "paper": shown,
        "paired_table": paired_table(significance, labels), "figures": figures,
    })


def body(params: dict[str, Any], run: StageRun) -> None:
    atomic_write_text(REPORT, render(params))
    run.log_artifact(REPORT)
    for figure in sorted(FIGURES.glob("*.png")):
        run.log_artifact(figure)


if __name__ == "__main__":
    run_stage("report", body)
