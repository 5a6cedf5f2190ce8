"""Stage 6: every registered scoring function (MCP, MC Dropout, TrustScore, the TCP
oracle, ...) on the validation and test splits, one file per method. Every context
carries the validation logits and labels, for the methods fitted there (temperature
scaling).

Segmentation: every scoring function that works per pixel, on every non-void pixel,
computed image batch by image batch (:func:`pipeline.segmentation.pixel_baselines`);
TrustScore searches exactly a seeded sample of ``baselines.trustscore_train_pixels``
training pixels' decoder features. ``segmentation.SKIPPED_SCORERS`` lists those skipped,
and why."""

from __future__ import annotations

# First: under DVC, starts this stage's MLflow process while the imports below run.
import pipeline.early_tracking  # noqa: F401

# isort: split
from typing import Any

from pipeline.artifacts import BASELINE_SCORES, CLASSIFIER, DATA
from pipeline.baselines import SCORERS, ClassIndexes, ScoringContext, fit_temperature
from pipeline.data import load_dataset
from pipeline.io import atomic_write_npz
from pipeline.models import load_classifier
from pipeline.outputs import Features, load_features
from pipeline.runtime import compute, compute_params, computing, resolve_device
from pipeline.segmentation import SKIPPED_SCORERS, pixel_baselines, sample_training_pixels
from pipeline.stage import run_stage_process
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
    if dataset.void_label is not None:
        cfg = params["baselines"]
        sample = sample_training_pixels(classifier, dataset["train"], dataset.void_label,
                                        cfg["trustscore_train_pixels"], params["seed"], device)
        neighbours = ClassIndexes(*sample, dataset.num_classes, device)
        names = [name for name in SCORERS.names() if name not in SKIPPED_SCORERS]
        per_split = {split: pixel_baselines(classifier, dataset[split], dataset.void_label,
                                            neighbours, cfg, params["seed"], device, names)
                     for split in ("val", "test")}
        for name in names:
            atomic_write_npz(BASELINE_SCORES / f"{name}.npz",
                             **{split: scores[name] for split, scores in per_split.items()})
        run.log_metrics({"methods": len(names), "trustscore_train_pixels": len(sample[1])})
        return
    train, val = (_classification(load_features(s)) for s in ("train", "val"))
    contexts = {}
    for split in ("val", "test"):
        feats = _classification(load_features(split))
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


def _classification(features: object) -> Features:
    assert isinstance(features, Features), "classification features expected"
    return features


if __name__ == "__main__":
    run_stage_process("baselines", body)
