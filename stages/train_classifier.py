"""Stage 2: train the classifier (training images augmented as the setting says); keep the
epoch with the best validation accuracy (segmentation: mean IoU), measured on unaugmented
validation images."""

from __future__ import annotations

# First: under DVC, starts this stage's MLflow process while the imports below run.
import pipeline.early_tracking  # noqa: F401

# isort: split
from typing import Any

from pipeline.artifacts import CLASSIFIER, CLASSIFIER_CURVES, CLASSIFIER_METRICS, DATA
from pipeline.augment import Augmentation
from pipeline.checkpoint import Checkpointer
from pipeline.data import load_dataset
from pipeline.distributed import is_main
from pipeline.io import atomic_torch_save, atomic_write_json, atomic_write_text, history_csv
from pipeline.models import build_classifier
from pipeline.runtime import compute_params, computing
from pipeline.stage import run_stage_process
from pipeline.tracking import StageRun, classifier_summary_metrics
from pipeline.training import resolve_device, train_classifier


def body(params: dict[str, Any], run: StageRun) -> None:
    with computing(**compute_params(params)):
        train(params, run)


def train(params: dict[str, Any], run: StageRun) -> None:
    device = resolve_device(params["device"])
    checkpointer = Checkpointer.for_stage("train_classifier", params)
    data = load_dataset(DATA)
    cfg = params["classifier"]
    model = build_classifier(data.input_shape, data.num_classes, cfg)
    augment = Augmentation.from_params(cfg["augmentation"], data.pad_value)
    result = train_classifier(model, data["train"], data["val"], cfg, device, params["seed"],
                              log=lambda epoch, row: run.log_metrics(row, step=epoch),
                              checkpointer=checkpointer, augment=augment,
                              num_classes=data.num_classes, void_label=data.void_label)
    if not is_main():
        return  # the other training processes only helped train
    atomic_torch_save(CLASSIFIER, result.best_state)
    best = result.history[result.best_epoch - 1]
    summary = {"best_epoch": result.best_epoch, "val_accuracy": best["val_accuracy"],
               "train_accuracy": best["train_accuracy"]}
    if "val_miou" in best:  # segmentation: pixel accuracies above, and the mean IoU
        summary.update(val_miou=best["val_miou"], train_miou=best["train_miou"])
    atomic_write_json(CLASSIFIER_METRICS, summary)
    atomic_write_text(CLASSIFIER_CURVES, history_csv(result.history))
    run.log_metrics(classifier_summary_metrics(summary))
    run.log_artifact(CLASSIFIER)
    checkpointer.clear()  # outputs written: nothing left to resume


if __name__ == "__main__":
    run_stage_process("train_classifier", body, distributed=True)
