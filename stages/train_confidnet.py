"""Stage 4: ConfidNet phase 1 (paper Sec. 2.2): the head learns the criterion on the
frozen classifier's penultimate features (every classifier parameter frozen, batch-norm in
eval mode); epoch kept on validation AUPR-Error.

``confidnet.features`` chooses what the head trains on:

- ``cached`` (default): the features ``extract_features`` computed once, of unaugmented
  images. Exact when the setting has no augmentation (MNIST, SVHN): phase 1 freezes the
  classifier, so features of the same inputs never change. Fast: no image passes.
- ``on_the_fly``: every training batch is augmented as the classifier's training was, the
  frozen classifier computes its features and the target (TCP of its output on the
  augmented image), as the authors' loaders do. Costs a classifier forward per batch; the
  head then sees the same input distribution as during the authors' phase 1 on CIFAR.
  Validation and test are never augmented, so they read the cached features either way.
- ``on_the_fly_dropout``: as ``on_the_fly``, with the frozen classifier's dropout active
  (batch-norm still in eval mode), so each pass gives other features and another TCP
  target. The shared notes say "BN in eval mode" for phase 1 and "dropout off" only for
  fine-tuning; the authors' phase 1 may have kept dropout on. On real MNIST it reduces the
  head's memorisation of the few training errors (``reports/README.md``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from pipeline.artifacts import CLASSIFIER, CONFIDNET, CONFIDNET_SCORES, DATA, METRICS, PLOTS
from pipeline.augment import Augmentation
from pipeline.checkpoint import Checkpointer
from pipeline.data import Split, load_dataset
from pipeline.features import AugmentedTargets, confidence_targets, load_features
from pipeline.io import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_npz,
    atomic_write_text,
    history_csv,
)
from pipeline.losses import LOSSES
from pipeline.models import ConfidNetHead, load_classifier
from pipeline.stage import run_stage
from pipeline.tracking import StageRun, confidnet_summary_metrics
from pipeline.training import Relabel, confidence_scores, fit_confidence, resolve_device


def loss_kwargs(params: dict[str, Any]) -> dict[str, float]:
    cfg = params["confidnet"]
    return {"focal_alpha": cfg["focal_alpha"], "focal_gamma": cfg["focal_gamma"]}


def on_the_fly_targets(params: dict[str, Any], device: torch.device,
                       dropout: bool) -> tuple[Split, Relabel]:
    """The training images, and what turns a batch of them into augmented features and
    their targets through the frozen classifier (with its dropout active if ``dropout``)."""
    dataset = load_dataset(DATA)
    classifier = load_classifier(CLASSIFIER, dataset.input_shape, dataset.num_classes,
                                 params["classifier"]).to(device)
    augment = Augmentation.from_params(params["classifier"]["augmentation"], dataset.pad_value)
    return dataset["train"], AugmentedTargets(classifier, augment, params["criterion"],
                                              features=True, dropout=dropout)


def body(params: dict[str, Any], run: StageRun) -> None:
    device = resolve_device(params["device"])
    checkpointer = Checkpointer.for_stage("train_confidnet", params)
    cfg = params["confidnet"]
    splits = {s: load_features(s) for s in ("train", "val", "test")}
    head = ConfidNetHead(splits["train"].features.shape[1], cfg["width"], cfg["layers"])
    data = {s: confidence_targets(f, params["criterion"]) for s, f in splits.items()}
    train, relabel = data["train"], None
    if cfg["features"] != "cached":
        images, relabel = on_the_fly_targets(params, device,
                                             dropout=cfg["features"] == "on_the_fly_dropout")
        train = replace(train, inputs=images.x)
    result = fit_confidence(
        head, train, data["val"], LOSSES[params["loss"]], loss_kwargs(params),
        epochs=cfg["epochs"], lr=cfg["lr"], batch_size=cfg["batch_size"], device=device,
        seed=params["seed"], log=lambda epoch, row: run.log_metrics(row, step=epoch),
        desc="train confidnet", checkpointer=checkpointer, relabel=relabel,
    )
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
    atomic_write_json(METRICS / "train_confidnet.json", summary)
    atomic_write_text(PLOTS / "confidnet_curves.csv", history_csv(result.history))
    run.log_metrics(confidnet_summary_metrics(summary))
    run.log_artifact(CONFIDNET)
    checkpointer.clear()  # outputs written: nothing left to resume


if __name__ == "__main__":
    run_stage("train_confidnet", body)
