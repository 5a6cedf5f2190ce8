"""Stage 4: ConfidNet phase 1 (paper Sec. 2.2): the head learns the criterion on the
frozen classifier's penultimate features (every classifier parameter frozen, batch-norm in
eval mode); epoch kept on validation AUPR-Error.

``confidnet.features`` chooses what the head trains on:

- ``dropout`` (the paper presets' default): the authors' phase 1. Their learner puts the
  whole classifier in train mode and only batch-norm back in eval mode, so the frozen
  classifier's dropout stays active: every training batch (augmented as the classifier's
  training was) gives dropout-perturbed features, and the TCP target of the prediction made
  from those same features. Where the classifier's only dropout acts on the penultimate
  features (the MLP) and there is no augmentation, this is computed exactly from the cached
  features and the last layer (:class:`~pipeline.features.FeatureDropoutTargets`, no
  encoder pass); otherwise one frozen forward pass per batch.
- ``no_dropout``: every training batch augmented and passed through the frozen classifier
  in eval mode (deterministic features and targets of the augmented images).
- ``cached``: the features ``extract_features`` computed once, in eval mode, of unaugmented
  images. The fastest approximation; equal to ``no_dropout`` when the setting has no
  augmentation. On real MNIST it lets the head memorise the few training errors
  (``reports/README.md``).

Validation and test are never augmented nor perturbed: they read the cached features.

Segmentation (CamVid): the head is the per-pixel convolutional one over the decoder's
feature maps, which are not cached: every training batch goes through the frozen SegNet
(dropout active with ``dropout``), flipped with its label maps, and the TCP of each pixel
is its target, void pixels out of the loss (:class:`~pipeline.features.SegmentationTargets`);
validation and test confidences are computed image by image from the frozen classifier
in eval mode (:mod:`pipeline.segmentation`).
"""

from __future__ import annotations

# First: under DVC, starts this stage's MLflow process while the imports below run.
import pipeline.early_tracking  # noqa: F401

# isort: split
import sys
from dataclasses import replace
from typing import Any

import torch

from pipeline.artifacts import (
    CLASSIFIER,
    CONFIDNET,
    CONFIDNET_CURVES,
    CONFIDNET_METRICS,
    CONFIDNET_SCORES,
    DATA,
)
from pipeline.augment import Augmentation
from pipeline.checkpoint import Checkpointer
from pipeline.data import load_dataset
from pipeline.distributed import is_main
from pipeline.features import (
    AugmentedTargets,
    FeatureDropoutTargets,
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
from pipeline.models import ConfidNetHead, build_confidnet_head, load_classifier
from pipeline.outputs import Features, PixelFeatures
from pipeline.runtime import compute, compute_params, computing, resolve_device
from pipeline.segmentation import FrozenEncoderHead, pixel_confidences
from pipeline.stage import run_stage_process
from pipeline.tracking import StageRun, confidnet_summary_metrics
from pipeline.training import ConfidenceData, Relabel, confidence_scores, fit_confidence


def per_batch_targets(params: dict[str, Any], device: torch.device,
                      cached: torch.Tensor) -> tuple[torch.Tensor, Relabel]:
    """The training inputs of phase 1 and what turns a batch of them into the head's
    inputs and targets, for ``confidnet.features`` ``dropout`` or ``no_dropout``:
    the cached features themselves where that is exact (see the module docstring), else
    the training images, run through the frozen classifier batch by batch."""
    dataset = load_dataset(DATA)
    classifier = load_classifier(CLASSIFIER, dataset.input_shape, dataset.num_classes,
                                 params["classifier"])
    compute().prepare(classifier, device)
    augment = Augmentation.from_params(params["classifier"]["augmentation"], dataset.pad_value)
    dropout = params["confidnet"]["features"] == "dropout"
    if dropout and not augment.active and classifier.dropout_only_on_features:
        sys.stderr.write(f"phase 1: dropout applied to the cached features (exact for "
                         f"{type(classifier).__name__}: no encoder pass)\n")
        return cached, FeatureDropoutTargets(classifier, params["criterion"])
    return dataset["train"].x, AugmentedTargets(classifier, augment, params["criterion"],
                                                features=True, dropout=dropout)


def segmentation_body(params: dict[str, Any], run: StageRun,
                      checkpointer: Checkpointer) -> None:
    """Phase 1 for a segmentation model (see the module docstring)."""
    device = resolve_device(params["device"])
    cfg = params["confidnet"]
    dataset = load_dataset(DATA)
    void = dataset.void_label
    assert void is not None
    classifier = load_classifier(CLASSIFIER, dataset.input_shape, dataset.num_classes,
                                 params["classifier"])
    compute().prepare(classifier, device)
    head = build_confidnet_head(classifier, cfg)
    pixels = {s: load_features(s) for s in ("train", "val")}
    train = ConfidenceData(inputs=dataset["train"].x, target=torch.empty(0),
                           correct=torch.from_numpy(pixels["train"].correct),
                           labels=dataset["train"].y)
    val = ConfidenceData(inputs=dataset["val"].x, target=torch.empty(0),
                         correct=torch.from_numpy(pixels["val"].correct))
    relabel = SegmentationTargets(classifier, params["criterion"], void,
                                  hflip=params["classifier"]["augmentation"]["hflip"],
                                  features=True, dropout=cfg["features"] == "dropout")
    scorer = FrozenEncoderHead(classifier, head)
    result = fit_confidence(
        head, train, val, LOSSES[params["loss"]], loss_kwargs(params),
        epochs=cfg["epochs"], lr=cfg["lr"], batch_size=cfg["batch_size"], device=device,
        seed=params["seed"], log=lambda epoch, row: run.log_metrics(row, step=epoch),
        desc="train confidnet", checkpointer=checkpointer, relabel=relabel,
        val_scores=lambda: pixel_confidences(scorer, dataset["val"], void, device),
    )
    head.load_state_dict(result.best_state)
    scores = {s: pixel_confidences(scorer, dataset[s], void, device) for s in ("val", "test")}
    write_outputs(run, checkpointer, result, head, scores, pixels["train"])


def write_outputs(run: StageRun, checkpointer: Checkpointer, result: Any, head: torch.nn.Module,
                  scores: dict[str, Any], train: Features | PixelFeatures) -> None:
    """The stage's outputs: the best head, its scores, its summary and curve."""
    atomic_torch_save(CONFIDNET, result.best_state)
    atomic_write_npz(CONFIDNET_SCORES, **scores)
    correct = train.correct
    summary = {
        "best_epoch": result.best_epoch,
        "val_aupr_error": result.best_value,
        "train_errors": int((1 - correct).sum()),
        "train_size": len(correct),
    }
    atomic_write_json(CONFIDNET_METRICS, summary)
    atomic_write_text(CONFIDNET_CURVES, history_csv(result.history))
    run.log_metrics(confidnet_summary_metrics(summary))
    run.log_artifact(CONFIDNET)
    checkpointer.clear()  # outputs written: nothing left to resume


def body(params: dict[str, Any], run: StageRun) -> None:
    with computing(**compute_params(params)):
        train(params, run)


def train(params: dict[str, Any], run: StageRun) -> None:
    device = resolve_device(params["device"])
    checkpointer = Checkpointer.for_stage("train_confidnet", params)
    if params["task"] == "segmentation":
        segmentation_body(params, run, checkpointer)
        return
    cfg = params["confidnet"]
    splits = {s: load_features(s) for s in ("train", "val", "test")}
    classification = [f for f in splits.values() if isinstance(f, Features)]
    assert len(classification) == 3, "classification features expected"
    head = ConfidNetHead(classification[0].features.shape[1], cfg["width"], cfg["layers"])
    data = {s: confidence_targets(f, params["criterion"])
            for s, f in zip(splits, classification, strict=True)}
    train, relabel = data["train"], None
    if cfg["features"] != "cached":
        inputs, relabel = per_batch_targets(params, device, train.inputs)
        train = replace(train, inputs=inputs)
    result = fit_confidence(
        head, train, data["val"], LOSSES[params["loss"]], loss_kwargs(params),
        epochs=cfg["epochs"], lr=cfg["lr"], batch_size=cfg["batch_size"], device=device,
        seed=params["seed"], log=lambda epoch, row: run.log_metrics(row, step=epoch),
        desc="train confidnet", checkpointer=checkpointer, relabel=relabel,
    )
    if not is_main():
        return  # the other training processes only helped train
    head.load_state_dict(result.best_state)
    scores = {s: confidence_scores(head, data[s].inputs, device) for s in ("val", "test")}
    write_outputs(run, checkpointer, result, head, scores, classification[0])


if __name__ == "__main__":
    run_stage_process("train_confidnet", body, distributed=True)
