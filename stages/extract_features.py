"""Stage 3: penultimate features, logits and labels of the frozen classifier.

Segmentation: the label and prediction of every non-void pixel and the map of those pixels
(:class:`pipeline.outputs.PixelFeatures`), and the first ``report.figure_images`` test
images with their label maps (``features/figure_images.npz``, for the report's Fig. 5)."""

from __future__ import annotations

# First: under DVC, starts this stage's MLflow process while the imports below run.
import pipeline.early_tracking  # noqa: F401

# isort: split
from typing import Any

from pipeline.artifacts import CLASSIFIER, DATA
from pipeline.camvid import raw_images
from pipeline.data import SPLITS, load_dataset
from pipeline.features import extract
from pipeline.models import load_classifier
from pipeline.outputs import Features, PixelFeatures, save_features, save_figure_images
from pipeline.runtime import compute, compute_params, computing, resolve_device
from pipeline.segmentation import pixel_features
from pipeline.stage import run_stage_process
from pipeline.tracking import StageRun


def body(params: dict[str, Any], run: StageRun) -> None:
    with computing(**compute_params(params)):
        extract_all(params, run)


def extract_all(params: dict[str, Any], run: StageRun) -> None:
    device = resolve_device(params["device"])
    data = load_dataset(DATA)
    classifier = load_classifier(CLASSIFIER, data.input_shape, data.num_classes,
                                     params["classifier"])
    compute().prepare(classifier, device)
    for split in SPLITS:
        features: Features | PixelFeatures
        if data.void_label is not None:
            features = pixel_features(classifier, data[split], data.void_label, device)
        else:
            features = extract(classifier, data[split], 4096, device)
        save_features(split, features)
        run.log_metrics({f"{split}_accuracy": float(features.correct.mean()),
                         f"{split}_errors": float((1 - features.correct).sum())})

    if data.task == "segmentation":
        save_figure_images(*raw_images(DATA, "test", params["report"]["figure_images"]))


if __name__ == "__main__":
    run_stage_process("extract_features", body)
