"""Measured epoch times of a setting's full recipe on this machine, and the projected wall
time of one seed.

For each setting, on synthetic data of the real shapes (MNIST: 54,000 training, 6,000
validation and 10,000 test images of 1x28x28), times a few batches of each loop the
pipeline runs and scales them to whole epochs: a classifier epoch (SGD steps, then the
train and validation accuracy passes the loop makes), a phase-1 epoch in the authors'
scheme (``confidnet.features=dropout``: dropout-perturbed features and targets per batch,
from cached features where the architecture allows, else a frozen forward pass; then the
validation pass), a fine-tuning epoch (encoder copy + head) and the 50 MC Dropout passes.
The projection multiplies them by the preset's epochs. Library calls only, single process.

    python benchmarks/epoch_times.py mnist_mlp mnist_smallconv
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch

from pipeline.augment import Augmentation
from pipeline.config import read_yaml
from pipeline.features import AugmentedTargets, FeatureDropoutTargets
from pipeline.losses import LOSSES
from pipeline.models import ConfidNetHead, ConfidNetModel, build_classifier, enable_mc_dropout
from pipeline.settings import compose

SHAPES = {"mnist": ((1, 28, 28), 10, 54_000, 6_000, 10_000)}
CPU = torch.device("cpu")


def per_batch(step: Callable[[], Any], batches: int, warmup: int = 3) -> float:
    """Seconds per call of ``step`` (median of ``batches`` timed calls after ``warmup``)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def measure(setting: str, batches: int) -> dict[str, float]:
    params = read_yaml(compose([f"setting={setting}"]))
    shape, classes, n_train, n_val, n_test = SHAPES[params["dataset"]]
    cls_cfg, cfg = params["classifier"], params["confidnet"]
    batch = cls_cfg["batch_size"]
    torch.manual_seed(0)
    model = build_classifier(shape, classes, cls_cfg)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, classes, (batch,))
    big = torch.randn(4096, *shape)
    sgd = torch.optim.SGD(model.parameters(), lr=cls_cfg["lr"], momentum=cls_cfg["momentum"])

    def classifier_step() -> None:
        model.train()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        sgd.zero_grad()
        loss.backward()
        sgd.step()

    @torch.no_grad()
    def eval_4096() -> None:
        model.eval()
        model(big)

    steps = math.ceil(n_train / batch)
    eval_chunks = (n_train + n_val) / 4096
    t = {"classifier_epoch": steps * per_batch(classifier_step, batches)
         + eval_chunks * per_batch(eval_4096, max(3, batches // 10))}

    model.eval()
    head = ConfidNetHead(model.feature_dim, cfg["width"], cfg["layers"])
    adam = torch.optim.Adam(head.parameters(), lr=cfg["lr"])
    augment = Augmentation.from_params(cls_cfg["augmentation"], (0.0,) * shape[0])
    generator = torch.Generator().manual_seed(0)
    exact = not augment.active and model.dropout_only_on_features
    relabel = (FeatureDropoutTargets(model, params["criterion"]) if exact else
               AugmentedTargets(model, augment, params["criterion"], features=True,
                                dropout=True))
    inputs = torch.randn(batch, model.feature_dim).relu() if exact else x
    loss_fn = LOSSES[params["loss"]]

    def phase1_step() -> None:
        head.train()
        features, target, correct = relabel(inputs, y, generator)
        loss = loss_fn(head(features), target, correct)
        adam.zero_grad()
        loss.backward()
        adam.step()

    val_features = torch.randn(n_val, model.feature_dim)

    @torch.no_grad()
    def phase1_validation() -> None:
        head.eval()
        head(val_features)

    t["phase1_epoch"] = (steps * per_batch(phase1_step, batches)
                         + per_batch(phase1_validation, 3))
    model.eval()
    finetuned = ConfidNetModel(model, head)
    adam_ft = torch.optim.Adam(finetuned.parameters(), lr=params["finetune"]["lr"])

    def finetune_step() -> None:
        finetuned.train()
        loss = loss_fn(finetuned(x), torch.rand(batch), torch.ones(batch))
        adam_ft.zero_grad()
        loss.backward()
        adam_ft.step()

    t["finetune_epoch"] = (steps * per_batch(finetune_step, batches)
                           + (n_val / 4096) * per_batch(eval_4096, 3))

    @torch.no_grad()
    def mc_pass() -> None:
        enable_mc_dropout(model)
        model(big)

    t["mc_dropout_50"] = params["baselines"]["mc_samples"] * (n_val + n_test) / 4096 * (
        per_batch(mc_pass, 3))
    t["one_seed_hours"] = (cls_cfg["epochs"] * t["classifier_epoch"]
                           + cfg["epochs"] * t["phase1_epoch"]
                           + params["finetune"]["epochs"] * t["finetune_epoch"]
                           + t["mc_dropout_50"]) / 3600
    t["epochs"] = f"{cls_cfg['epochs']} / {cfg['epochs']} / {params['finetune']['epochs']}"
    t["phase1_path"] = "cached features" if exact else "frozen forward"
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", nargs="+")
    parser.add_argument("--batches", type=int, default=30, help="timed batches per loop")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f} at start; seconds")
    print("| setting | classifier epoch | phase-1 epoch (path) | fine-tuning epoch | "
          "MC Dropout (50 passes) | epochs cls / phase 1 / ft | one seed, hours |")
    print("|---|---|---|---|---|---|---|")
    for setting in args.settings:
        t = measure(setting, args.batches)
        print(f"| {setting} | {t['classifier_epoch']:.2f} | {t['phase1_epoch']:.2f} "
              f"({t['phase1_path']}) | {t['finetune_epoch']:.2f} | {t['mc_dropout_50']:.1f} | "
              f"{t['epochs']} | {t['one_seed_hours']:.2f} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
