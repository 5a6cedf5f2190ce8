"""Stage 8: ``reports/report.md`` with its figures, readable on its own."""

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
    TRACKED_STAGES,
    VALIDATION_METRICS,
    run_record_path,
)
from pipeline.io import atomic_write_text, read_json
from pipeline.outputs import load_features, load_scores
from pipeline.report import (
    paper_rows,
    paper_table,
    provenance_table,
    render_report,
    results_table,
    save_figures,
    significance_table,
    verdict,
)
from pipeline.stage import run_stage
from pipeline.tracking import StageRun, tracking_uri


def render(params: dict[str, Any], this_run: StageRun) -> str:
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
    test_features = load_features("test")
    figures = save_figures(FIGURES, scores, test_features.correct, scores["tcp_oracle"]["test"])
    records = [read_json(run_record_path(s)) for s in TRACKED_STAGES[:-1]
               if run_record_path(s).exists()]
    records.append(this_run.record())

    paper = paper_table(params["setting"])
    return render_report({
        "params": params, "params_yaml": yaml.safe_dump(params, sort_keys=False).rstrip(),
        "verdict": verdict(test, significance, test_errors), "evaluation": evaluation,
        "test": test, "validation": validation, "split": split, "classifier": classifier,
        "confidnet": confidnet, "finetune": finetune,
        "results_table": results_table(test, intervals),
        "paper": None if paper is None else {"setting": paper[0], "row": paper[1],
                                             "table": paper_rows(paper[1])},
        "significance_table": significance_table(significance), "figures": figures,
        "run": this_run.context, "tracking_uri": tracking_uri(),
        "provenance_table": provenance_table(records),
    })


def body(params: dict[str, Any], run: StageRun) -> None:
    atomic_write_text(REPORT, render(params, run))
    run.log_artifact(REPORT)
    for figure in sorted(FIGURES.glob("*.png")):
        run.log_artifact(figure)


if __name__ == "__main__":
    run_stage("report", body)
