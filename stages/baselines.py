"""Stage 6: every registered scoring function (MCP, MC Dropout, TrustScore, the TCP
oracle, ...) on the validation and test splits, one file per method. Every context
carries the validation logits and labels, for the methods fitted there (temperature
scaling)."""

from __future__ import annotations

from typing import Any

from pipeline.artifacts import BASELINE_SCORES, CLASSIFIER, DATA
from pipeline.baselines import SCORERS, ScoringContext, fit_temperature
from pipeline.data import load_dataset
from pipeline.io import atomic_write_npz
from pipeline.models import load_classifier
from pipeline.outputs import load_features
from pipeline.runtime import compute, compute_params, computing, resolve_device
from pipeline.stage import run_stage
from pipeline.tracking import StageRun


def body(params: dict[str, Any], run: StageRun) -> None:
    with computing(**compute_params(params)):
        score_all(params, run)


def score_all(params: dict[str, Any], run: StageRun) -> None:
    device = resolve_device(params["device"])
    dataset = load_dataset(DATA)
    classifier = load_classifier(CLASSIFIER, dataset.input_shape, dataset.num_classes,
                                     params["classifier"])
    compute().prepare(classifier, device)
    train = load_features("train")
    val = load_features("val")
    contexts = {}
    for split in ("val", "test"):
        feats = load_features(split)
        contexts[split] = ScoringContext(
            logits=feats.logits, labels=feats.labels, features=feats.features,
            train_features=train.features, train_labels=train.labels, classifier=classifier,
            inputs=dataset[split].x, device=device, seed=params["seed"],
            params=params["baselines"], val_logits=val.logits, val_labels=val.labels,
        )
    for name, scorer in SCORERS.items():
        scores = {split: scorer(ctx) for split, ctx in contexts.items()}
        atomic_write_npz(BASELINE_SCORES / f"{name}.npz", **scores)
    run.log_metrics({"methods": len(SCORERS.names()),
                     "temperature": fit_temperature(val.logits, val.labels)})


if __name__ == "__main__":
    run_stage("baselines", body)
