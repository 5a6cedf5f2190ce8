"""Stage 8: ``reports/report.md`` with its figures, readable on its own.

The report is a function of the stage outputs and ``params.yaml`` only: no MLflow run id,
git commit, path or time, so the same inputs give the same bytes and a rerun leaves
``dvc.lock`` unchanged. Where the runs are is said by name (the MLflow experiment of
``tracking.experiment``), not by id.
"""

from __future__ import annotations

# First: under DVC, starts this stage's MLflow process while the imports below run.
import pipeline.early_tracking  # noqa: F401

# isort: split
from typing import Any

import yaml

from pipeline.artifacts import (
    CLASSIFIER_METRICS,
    CONFIDNET_METRICS,
    DATA,
    FIGURE_IMAGES,
    FIGURES,
    FINETUNE_METRICS,
    INTERVALS,
    REPORT,
    SIGNIFICANCE,
    TEST_METRICS,
    VALIDATION_METRICS,
)
from pipeline.camvid_labels import CLASSES
from pipeline.io import atomic_write_text, load_npz, read_json
from pipeline.metrics import SEGMENTATION_CURVE_POINTS
from pipeline.outputs import (
    SEGMENTATION,
    Features,
    PixelFeatures,
    load_features,
    load_scores,
    task_of,
)
from pipeline.report import (
    FINAL,
    PHASE1,
    beside_paper_table,
    iou_table,
    merged_confidnet,
    method_labels,
    paired_table,
    paper_rows,
    paper_table,
    pixel_maps,
    render_report,
    results_table,
    save_figures,
    save_segmentation_figure,
    verdict,
)
from pipeline.stage import run_stage_process
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
    segmentation = task_of(params) == SEGMENTATION
    figures = save_figures(FIGURES, scores, test_features.correct,
                           scores["tcp_oracle"]["test"], labels,
                           max_points=SEGMENTATION_CURVE_POINTS if segmentation else None)
    seg: dict[str, Any] | None = None
    if segmentation:
        seg = segmentation_data(params, evaluation, scores, test_features, labels[FINAL])
        figures.append(seg.pop("figure"))

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
        "verdict": verdict(test, significance, test_errors, labels,
                           noun="misclassified pixel" if segmentation else "error"),
        "segmentation": seg,
        "evaluation": evaluation, "test": test, "validation": validation, "split": split,
        "classifier": classifier, "confidnet": confidnet, "finetune": finetune,
        "merged": merged, "final_label": labels[FINAL],
        "results_table": results_table(test, intervals, labels), "paper": shown,
        "paired_table": paired_table(significance, labels), "figures": figures,
    })


def segmentation_data(params: dict[str, Any], evaluation: dict[str, Any],
                      scores: dict[str, dict[str, Any]],
                      test_features: Features | PixelFeatures,
                      confidnet_label: str) -> dict[str, Any]:
    """What the report adds for a segmentation: mIoU and per-class IoU, the bootstrap's
    unit, TrustScore's training-pixel sample and the paper's Fig. 5 (its ``figure``)."""
    if test_features.valid is None:
        raise ValueError("task is segmentation but features/test.npz has no `valid` mask; "
                         "rerun extract_features")
    shown = load_npz(FIGURE_IMAGES)
    count = min(int(params.get("report", {}).get("figure_images", 3)), len(shown["images"]))
    maps = pixel_maps(test_features.valid, {
        "prediction": test_features.predictions, "correct": test_features.correct,
        "confidnet": scores[FINAL]["test"], "mcp": scores["mcp"]["test"]}, count)
    figure = save_segmentation_figure(FIGURES, shown["images"][:count],
                                      shown["labels"][:count], maps, confidnet_label)
    return {"test": evaluation["segmentation"], "bootstrap": evaluation["bootstrap"],
            "iou_table": iou_table(evaluation["segmentation"], CLASSES),
            "trustscore_train_pixels": params["baselines"]["trustscore_train_pixels"],
            "images": int(test_features.valid.shape[0]),
            "figure": figure}


def body(params: dict[str, Any], run: StageRun) -> None:
    atomic_write_text(REPORT, render(params))
    run.log_artifact(REPORT)
    for figure in sorted(FIGURES.glob("*.png")):
        run.log_artifact(figure)


if __name__ == "__main__":
    run_stage_process("report", body, uses_torch=False)
