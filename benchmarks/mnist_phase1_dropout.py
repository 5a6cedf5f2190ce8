"""Phase 1 with the frozen classifier's dropout active, features and TCP targets drawn per
batch, against the project of a finished `mnist_mlp` run (its data/, models/, features/).

    OMP_NUM_THREADS=1 python benchmarks/mnist_phase1_dropout.py PROJECT EPOCHS

Prints each epoch's training loss and validation AUPR-Error, then the kept epoch and its
test AUPR-Error. Library calls only; `-S confidnet.features=on_the_fly_dropout` is the
pipeline's way to run the same thing.
"""

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.data import load_dataset
from pipeline.features import confidence_targets, criterion_targets, load_features
from pipeline.losses import LOSSES
from pipeline.metrics import aupr_error
from pipeline.models import ConfidNetHead, enable_mc_dropout, load_classifier
from pipeline.training import confidence_scores, fit_confidence

torch.manual_seed(0)
root = sys.argv[1]
cpu = torch.device("cpu")
ds = load_dataset(f"{root}/data")
cfg = {"model": "mlp", "hidden": 1000, "dropout": 0.3}
clf = load_classifier(f"{root}/models/classifier.pt", ds.input_shape, ds.num_classes, cfg)
feats = {s: load_features(s, root=Path(root)) for s in ("train", "val", "test")}
data = {s: confidence_targets(f, "tcp") for s, f in feats.items()}
train = replace(data["train"], inputs=ds["train"].x)

@torch.no_grad()
def relabel(images, labels, generator):
    enable_mc_dropout(clf)
    f = clf.encode(images)
    t, c = criterion_targets(clf.classify(f), labels, "tcp")
    return f, t, c

epochs = int(sys.argv[2])
head = ConfidNetHead(1000, 400, 4)
start = time.time()
res = fit_confidence(
    head, train, data["val"], LOSSES["mse"], {}, epochs=epochs, lr=1e-4, batch_size=128,
    device=cpu, seed=0, desc="dropout phase1", relabel=relabel,
    log=lambda e, r: print(e, {k: round(v, 5) for k, v in r.items()}, flush=True))
head.load_state_dict(res.best_state)
test = confidence_scores(head, data["test"].inputs, cpu)
print("best epoch", res.best_epoch, "val", res.best_value, "test AUPR-Error",
      aupr_error(test, feats["test"].correct), "seconds", time.time() - start)
