"""Stage 4: ConfidNet phase 1 (paper Sec. 2.2): the head learns the criterion on the
frozen classifier's cached penultimate features; epoch kept on validation AUPR-Error.

Training on cached features is exact here: phase 1 freezes every classifier parameter
and the embedded dataset has no augmentation, so features of the same inputs never change.
"""

from __future__ import annotations

from typing import Any

from pipeline.artifacts import CONFIDNET, CONFIDNET_SCORES, METRICS, PLOTS
from pipeline.checkpoint import Checkpointer
from pipeline.features import confidence_targets, load_features
from pipeline.io import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_npz,
    atomic_write_text,
    history_csv,
)
from pipeline.losses import LOSSES
from pipeline.models import ConfidNetHead
from pipeline.stage import run_stage
from pipeline.tracking import StageRun, confidnet_summary_metrics
from pipeline.training import confidence_scores, fit_confidence, resolve_device


def loss_kwargs(params: dict[str, Any]) -> dict[str, float]:
    cfg = params["confidnet"]
    return {"focal_alpha": cfg["focal_alpha"], "focal_gamma": cfg["focal_gamma"]}


def body(params: dict[str, Any], run: StageRun) -> None:
    device = resolve_device(params["device"])
    checkpointer = Checkpointer.for_stage("train_confidnet", params)
    cfg = params["confidnet"]
    splits = {s: load_features(s) for s in ("train", "val", "test")}
    data = {s: confidence_targets(f, params["criterion"]) for s, f in splits.items()}
    head = ConfidNetHead(splits["train"].features.shape[1], cfg["width"], cfg["layers"])
    result = fit_confidence(
        head, data["train"], data["val"], LOSSES[params["loss"]], loss_kwargs(params),
        epochs=cfg["epochs"], lr=cfg["lr"], batch_size=cfg["batch_size"], device=device,
        seed=params["seed"], log=lambda epoch, row: run.log_metrics(row, step=epoch),
        desc="train confidnet",
        checkpointer=checkpointer,
    )
    head.load_state_dict(result.best_state)
    atomic_torch_save(CONFIDNET, result.best_state)
    scores = {s: confidence_scores(head, data[s].inputs, device) for s in ("val", "test")}
    atomic_write_npz(CONFIDNET_SCORES, **scores)
    train = data["train"]
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
