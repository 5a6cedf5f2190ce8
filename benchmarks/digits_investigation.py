"""Why does the paper's recipe not beat MCP on digits on every seed?

Runs the library directly (no DVC, no MLflow) over several seeds with the default
setting (composed from ``conf/``, as DVC does) and prints, per seed, what ConfidNet had to
learn from and what it reached:

- errors of the classifier on the train / val / test splits (ConfidNet learns from the
  train split's errors, its epoch is chosen on the val split's errors, and every test
  AUPR-Error rests on the test split's errors);
- the TCP target on train vs test (an over-fitted classifier gives TCP ~ 1 on train);
- test AUPR-Error of MCP, TrustScore and ConfidNet phase 1 kept on val AUPR-Error, and
  ConfidNet at its last epoch (no selection), as diagnostics, not as tuning.

    python benchmarks/digits_investigation.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from pipeline.baselines import ScoringContext, maximum_class_probability, trust_score
from pipeline.config import read_yaml, validate
from pipeline.data import DATASETS, load_dataset
from pipeline.features import confidence_targets, extract
from pipeline.losses import LOSSES, loss_kwargs
from pipeline.metrics import aupr_error
from pipeline.models import ConfidNetHead, build_classifier
from pipeline.settings import compose
from pipeline.training import fit_confidence, predict, seed_everything, train_classifier


def one_seed(params: dict, seed: int) -> dict[str, float]:
    seed_everything(seed)
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        DATASETS[params["dataset"]].prepare(Path(tmp), params["data"], seed)
        data = load_dataset(Path(tmp))
    model = build_classifier(data.input_shape, data.num_classes, params["classifier"])
    fit = train_classifier(model, data["train"], data["val"], params["classifier"], device,
                           seed, lambda *_: None)
    model.load_state_dict(fit.best_state)
    feats = {s: extract(model, data[s], 4096, device) for s in ("train", "val", "test")}
    targets = {s: confidence_targets(f, params["criterion"]) for s, f in feats.items()}
    cfg = params["confidnet"]
    head = ConfidNetHead(feats["train"].features.shape[1], cfg["width"], cfg["layers"])
    result = fit_confidence(head, targets["train"], targets["val"], LOSSES[params["loss"]],
                            loss_kwargs(params),
                            cfg["epochs"], cfg["lr"], cfg["batch_size"], device, seed,
                            lambda *_: None, "confidnet")
    last = torch.sigmoid(predict(head, targets["test"].inputs, 4096, device)).numpy()
    head.load_state_dict(result.best_state)
    kept = torch.sigmoid(predict(head, targets["test"].inputs, 4096, device)).numpy()
    fitted = torch.sigmoid(predict(head, targets["train"].inputs, 4096, device)).numpy()
    tcp_train = targets["train"].target.numpy()
    # R^2 of the kept ConfidNet as a regressor of the TCP target on its own training data:
    # 0 means it learnt no more than the mean TCP.
    r2_train = 1 - np.mean((fitted - tcp_train) ** 2) / np.var(tcp_train)
    tcp_test = targets["test"].target.numpy()
    mcp_test = torch.softmax(torch.from_numpy(feats["test"].logits), -1).max(-1).values.numpy()
    test = feats["test"]
    ctx = ScoringContext(test.logits, test.labels, test.features, feats["train"].features,
                         feats["train"].labels)
    correct = test.correct
    return {
        "train_err": int((1 - feats["train"].correct).sum()),
        "val_err": int((1 - feats["val"].correct).sum()),
        "test_err": int((1 - correct).sum()),
        "tcp_train_mean": float(targets["train"].target.mean()),
        "tcp_test_mean": float(targets["test"].target.mean()),
        "tcp_train_below_0.9": float((targets["train"].target < 0.9).float().mean()),
        "tcp_test_below_0.9": float((targets["test"].target < 0.9).float().mean()),
        "kept_epoch": result.best_epoch,
        "steps": cfg["epochs"] * -(-len(tcp_train) // cfg["batch_size"]),
        "r2_train": float(r2_train),
        "r2_test": float(1 - np.mean((kept - tcp_test) ** 2) / np.var(tcp_test)),
        "r2_mcp_test": float(1 - np.mean((mcp_test - tcp_test) ** 2) / np.var(tcp_test)),
        "mcp": aupr_error(maximum_class_probability(ctx), correct),
        "trustscore": aupr_error(trust_score(ctx), correct),
        "confidnet_kept": aupr_error(kept, correct),
        "confidnet_last": aupr_error(last, correct),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Hydra overrides of the default setting, as `dvc exp run -S` "
                             "takes them, e.g. confidnet.epochs=500")
    args = parser.parse_args()
    params = validate(read_yaml(compose(args.set)))
    rows = [one_seed(params, seed) for seed in args.seeds]
    keys = list(rows[0])
    print("seed  " + "  ".join(f"{k[:14]:>14}" for k in keys))
    for seed, row in zip(args.seeds, rows, strict=True):
        print(f"{seed:<4}  " + "  ".join(
            f"{row[k]:>14.3f}" if isinstance(row[k], float) else f"{row[k]:>14}" for k in keys))
    mean = {k: np.mean([r[k] for r in rows]) for k in keys}
    print("mean  " + "  ".join(f"{mean[k]:>14.3f}" for k in keys))


if __name__ == "__main__":
    main()
