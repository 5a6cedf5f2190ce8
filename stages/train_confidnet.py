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
"""

from __future__ import annotations

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
from pipeline.models import ConfidNetHead, load_classifier
from pipeline.runtime import compute, compute_params, computing, resolve_device
from pipeline.stage import run_stage
from pipeline.tracking import StageRun, confidnet_summary_metrics
from pipeline.training import Relabel, confidence_scores, fit_confidence


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


def body(params: dict[str, Any], run: StageRun) -> None:
    with computing(**compute_params(params)):
        train(params, run)


def train(params: dict[str, Any], run: StageRun) -> None:
    device = resolve_device(params["device"])
    checkpointer = Checkpointer.for_stage("train_confidnet", params)
    cfg = params["confidnet"]
    splits = {s: load_features(s) for s in ("train", "val", "test")}
    head = ConfidNetHead(splits["train"].features.shape[1], cfg["width"], cfg["layers"])
    data = {s: confidence_targets(f, params["criterion"]) for s, f in splits.items()}
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
    atomic_torch_save(CONFIDNET, result.best_state)
    scores = {s: confidence_scores(head, data[s].inputs, device) for s in ("val", "test")}
    atomic_write_npz(CONFIDNET_SCORES, **scores)
    summary = {
        "best_epoch": result.best_epoch,
        "val_aupr_error": result.best_value,
        "train_errors": int((1 - train.correct).sum()),
        "train_size": len(train.correct),
    }
    atomic_write_json(CONFIDNET_METRICS, summary)
    atomic_write_text(CONFIDNET_CURVES, history_csv(result.history))
    run.log_metrics(confidnet_summary_metrics(summary))
    run.log_artifact(CONFIDNET)
    checkpointer.clear()  # outputs written: nothing left to resume


if __name__ == "__main__":
    run_stage("train_confidnet", body, distributed=True)
