"""Phase 1 on cached features against the authors' phase 1 (classifier dropout active), on
the same classifier per seed, selected on validation only.

For each seed: train the classifier of the default setting (composed from ``conf/``; library
calls, no DVC or MLflow),
then train ConfidNet's phase 1 once per ``confidnet.features`` mode from the same
initialisation and batch order, and keep each run's epoch with the best validation
AUPR-Error, as the pipeline does. Prints, per seed and mode, that validation AUPR-Error
(the figure a default is chosen on), the kept epoch and, for information only, the test
AUPR-Error of the kept head and of MCP. The mode with the higher mean validation
AUPR-Error is the one to make the default; test numbers play no part in that choice.

    python benchmarks/phase1_modes.py --seeds 0 1 2 3 4           # digits, the default
    python benchmarks/phase1_modes.py --set confidnet.epochs=300
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.augment import Augmentation
from pipeline.config import read_yaml, validate
from pipeline.data import DATASETS, load_dataset
from pipeline.features import (
    AugmentedTargets,
    FeatureDropoutTargets,
    confidence_targets,
    extract,
)
from pipeline.losses import LOSSES, loss_kwargs
from pipeline.metrics import aupr_error
from pipeline.models import ConfidNetHead, build_classifier
from pipeline.settings import compose
from pipeline.training import (
    Relabel,
    confidence_scores,
    fit_confidence,
    seed_everything,
    train_classifier,
)

MODES = ("cached", "dropout")
CPU = torch.device("cpu")


def phase1(params: dict[str, Any], mode: str, seed: int, classifier: torch.nn.Module,
           data: Any, feats: dict[str, Any]) -> dict[str, float]:
    cfg = params["confidnet"]
    targets = {s: confidence_targets(f, params["criterion"]) for s, f in feats.items()}
    train, relabel = targets["train"], None
    augment = Augmentation.from_params(params["classifier"]["augmentation"], data.pad_value)
    if mode == "dropout":
        relabel_fn: Relabel
        if not augment.active and classifier.dropout_only_on_features:
            relabel_fn = FeatureDropoutTargets(classifier, params["criterion"])
        else:
            relabel_fn = AugmentedTargets(classifier, augment, params["criterion"],
                                          features=True, dropout=True)
            train = confidence_targets(feats["train"], params["criterion"],
                                       inputs=data["train"].x)
        relabel = relabel_fn
    torch.manual_seed(seed)  # same head initialisation for every mode
    head = ConfidNetHead(feats["train"].features.shape[1], cfg["width"], cfg["layers"])
    result = fit_confidence(head, train, targets["val"], LOSSES[params["loss"]],
                            loss_kwargs(params), cfg["epochs"], cfg["lr"], cfg["batch_size"],
                            CPU, seed, lambda *_: None, f"phase 1 ({mode})", relabel=relabel)
    head.load_state_dict(result.best_state)
    test = confidence_scores(head, targets["test"].inputs, CPU)
    return {"val_aupr_error": result.best_value, "kept_epoch": result.best_epoch,
            "test_aupr_error": aupr_error(test, feats["test"].correct)}


def one_seed(params: dict[str, Any], seed: int) -> dict[str, dict[str, float]]:
    seed_everything(seed)
    with tempfile.TemporaryDirectory() as tmp:
        DATASETS[params["dataset"]].prepare(Path(tmp), params["data"], seed)
        data = load_dataset(Path(tmp))
    classifier = build_classifier(data.input_shape, data.num_classes, params["classifier"])
    fit = train_classifier(classifier, data["train"], data["val"], params["classifier"], CPU,
                           seed, lambda *_: None)
    classifier.load_state_dict(fit.best_state)
    classifier.eval()
    feats = {s: extract(classifier, data[s], 4096, CPU) for s in ("train", "val", "test")}
    mcp = torch.softmax(torch.from_numpy(feats["test"].logits), -1).max(-1).values.numpy()
    rows = {mode: phase1(params, mode, seed, classifier, data, feats) for mode in MODES}
    rows["mcp"] = {"test_aupr_error": aupr_error(mcp, feats["test"].correct),
                   "train_errors": int((1 - feats["train"].correct).sum())}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Hydra overrides of the default setting, as `dvc exp run -S` "
                             "takes them, e.g. confidnet.epochs=300")
    args = parser.parse_args()
    params = validate(read_yaml(compose(args.set)))
    print(f"setting {params['setting']}, {params['confidnet']['epochs']} phase-1 epochs, "
          f"loss {params['loss']}; AUPR-Error in %")
    print("| seed | train errors | mode | val (kept epoch) | kept epoch | test | MCP test |")
    print("|---|---|---|---|---|---|---|")
    by_mode: dict[str, list[float]] = {m: [] for m in MODES}
    for seed in args.seeds:
        rows = one_seed(params, seed)
        for mode in MODES:
            r = rows[mode]
            by_mode[mode].append(r["val_aupr_error"])
            print(f"| {seed} | {rows['mcp']['train_errors']} | {mode} | "
                  f"{100 * r['val_aupr_error']:.2f} | {r['kept_epoch']} | "
                  f"{100 * r['test_aupr_error']:.2f} | "
                  f"{100 * rows['mcp']['test_aupr_error']:.2f} |", flush=True)
    for mode in MODES:
        values = np.array(by_mode[mode])
        print(f"mean validation AUPR-Error, {mode}: {100 * values.mean():.2f} "
              f"(sd {100 * values.std(ddof=1) if values.size > 1 else 0:.2f})")


if __name__ == "__main__":
    main()
