"""Stage 5: ConfidNet phase 2 (paper Sec. 2.2, 'Learning scheme'): a copy of the
classifier's encoder plus the phase-1 head, trained end to end with dropout off, batch-norm
statistics frozen and a lower learning rate. The original classifier is never updated: the
targets and the predictions come from its cached logits. Epoch kept on validation
AUPR-Error, epoch 0 being the phase-1 model.

With an active ``classifier.augmentation`` each training batch is augmented, as the
authors' loaders do in every phase, and its targets come from the untouched classifier's
output on the augmented images (``features.AugmentedTargets``).

Segmentation: every batch's per-pixel targets come from the untouched classifier on the
(flipped) images (``features.SegmentationTargets``), void pixels out of the loss;
validation and test confidences are computed image by image (``pipeline.segmentation``)."""

from __future__ import annotations

# First: under DVC, starts this stage's MLflow process while the imports below run.
import pipeline.early_tracking  # noqa: F401

# isort: split
from typing import Any

import torch

from pipeline.artifacts import (
    CLASSIFIER,
    CONFIDNET,
    CONFIDNET_FINETUNED,
    DATA,
    FINETUNE_CURVES,
    FINETUNE_METRICS,
    FINETUNED_SCORES,
)
from pipeline.augment import Augmentation
from pipeline.checkpoint import Checkpointer
from pipeline.data import load_dataset
from pipeline.distributed import is_main
from pipeline.features import (
    AugmentedTargets,
    SegmentationTargets,
    confidence_targets,
    load_features,
)
from pipeline.io import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_npz,
    atomic_write_text,
    history_csv,
)
from pipeline.losses import LOSSES, loss_kwargs
from pipeline.models import ConfidNetModel, build_confidnet_head, load_classifier
from pipeline.outputs import Features
from pipeline.runtime import compute, compute_params, computing, resolve_device
from pipeline.segmentation import pixel_confidences
from pipeline.stage import run_stage_process
from pipeline.tracking import StageRun, confidnet_summary_metrics
from pipeline.training import ConfidenceData, Relabel, confidence_scores, fit_confidence


def body(params: dict[str, Any], run: StageRun) -> None:
    with computing(**compute_params(params)):
        train(params, run)


def train(params: dict[str, Any], run: StageRun) -> None:
    device = resolve_device(params["device"])
    checkpointer = Checkpointer.for_stage("finetune", params)
    cfg, head_cfg = params["finetune"], params["confidnet"]
    dataset = load_dataset(DATA)
    classifier = load_classifier(CLASSIFIER, dataset.input_shape, dataset.num_classes,
                                     params["classifier"])
    head = build_confidnet_head(classifier, head_cfg)
    head.load_state_dict(torch.load(CONFIDNET, map_location="cpu", weights_only=True))
    model = ConfidNetModel(classifier, head)
    augment = Augmentation.from_params(params["classifier"]["augmentation"], dataset.pad_value)
    # the untouched classifier that recomputes targets (the encoder copy is made above)
    void = dataset.void_label
    relabel: Relabel | None
    if void is not None:  # segmentation: targets per pixel, recomputed for every batch
        relabel = SegmentationTargets(compute().prepare(classifier, device),
                                      params["criterion"], void, hflip=augment.hflip)
        data = {s: ConfidenceData(inputs=dataset[s].x, target=torch.empty(0),
                                  correct=torch.from_numpy(load_features(s).correct),
                                  labels=dataset[s].y) for s in ("train", "val")}
    else:
        relabel = (AugmentedTargets(compute().prepare(classifier, device), augment,
                                    params["criterion"]) if augment.active else None)
        data = {s: confidence_targets(_classification(load_features(s)), params["criterion"],
                                      inputs=dataset[s].x) for s in ("train", "val", "test")}
    result = fit_confidence(
        model, data["train"], data["val"], LOSSES[params["loss"]],
        loss_kwargs(params), epochs=cfg["epochs"], lr=cfg["lr"], batch_size=cfg["batch_size"],
        device=device, seed=params["seed"],
        log=lambda epoch, row: run.log_metrics(row, step=epoch), desc="finetune",
        checkpointer=checkpointer, relabel=relabel,
        val_scores=(None if void is None else
                    lambda: pixel_confidences(model, dataset["val"], void, device)),
    )
    if not is_main():
        return  # the other training processes only helped train
    model.load_state_dict(result.best_state)
    atomic_torch_save(CONFIDNET_FINETUNED, result.best_state)
    if void is None:
        scores = {s: confidence_scores(model, data[s].inputs, device) for s in ("val", "test")}
    else:
        scores = {s: pixel_confidences(model, dataset[s], void, device) for s in ("val", "test")}
    atomic_write_npz(FINETUNED_SCORES, **scores)
    start = result.history[0]["val_aupr_error"]
    summary = {"best_epoch": result.best_epoch, "val_aupr_error": result.best_value,
               "val_aupr_error_before": start}
    atomic_write_json(FINETUNE_METRICS, summary)
    atomic_write_text(FINETUNE_CURVES, history_csv(result.history))
    run.log_metrics(confidnet_summary_metrics(summary))
    run.log_artifact(CONFIDNET_FINETUNED)
    checkpointer.clear()  # outputs written: nothing left to resume


def _classification(features: object) -> Features:
    assert isinstance(features, Features), "classification features expected"
    return features


if __name__ == "__main__":
    run_stage_process("finetune", body, distributed=True)
