"""The stages' array outputs as later stages read them: the frozen classifier's cached
penultimate features, logits and labels (``features/``, written once by
``extract_features``) and every method's confidence scores (``scores/``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import (
    BASELINE_SCORES,
    CONFIDNET_SCORES,
    FIGURE_IMAGES,
    FINETUNED_SCORES,
    features_path,
)
from pipeline.io import atomic_write_npz, load_npz

CLASSIFICATION, SEGMENTATION = "classification", "segmentation"
TASKS = (CLASSIFICATION, SEGMENTATION)


def task_of(params: Mapping[str, Any]) -> str:
    """The pipeline's task, from params' ``task`` (classification when absent)."""
    task = str(params.get("task", CLASSIFICATION))
    if task not in TASKS:
        raise ValueError(f"task = {task!r}; valid values: {', '.join(TASKS)}")
    return task


@dataclass(frozen=True)
class Features:
    features: np.ndarray  # (N, D)
    logits: np.ndarray  # (N, K)
    labels: np.ndarray  # (N,)

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @property
    def correct(self) -> np.ndarray:
        return (self.predictions == self.labels).astype(np.int64)

    # Classification has one sample per image: no pixel grid, no grouping.
    groups: None = None
    valid: None = None


@dataclass(frozen=True)
class PixelFeatures:
    """What ``extract_features`` keeps of a segmentation split: the label and the frozen
    classifier's prediction of every non-void pixel (int16 (P,), images in split order,
    pixels row-major), and where those pixels are (``valid``, bool (N, H, W), P =
    ``valid.sum()``). Logits and feature maps are not kept: at CamVid's size they would
    take tens of gigabytes; the stages that need them recompute them image by image."""

    labels: np.ndarray  # int16 (P,)
    predictions: np.ndarray  # int16 (P,)
    valid: np.ndarray  # bool (N, H, W)

    @property
    def correct(self) -> np.ndarray:
        return (self.predictions == self.labels).astype(np.int64)

    @property
    def groups(self) -> np.ndarray:
        """The image of every pixel, int32 (P,): what a bootstrap resamples by."""
        counts = self.valid.reshape(len(self.valid), -1).sum(axis=1)
        return np.repeat(np.arange(len(self.valid), dtype=np.int32), counts)


def save_features(split: str, features: Features | PixelFeatures, root: Path = Path()) -> None:
    if isinstance(features, PixelFeatures):
        atomic_write_npz(root / features_path(split), labels=features.labels,
                         predictions=features.predictions, valid=features.valid)
        return
    atomic_write_npz(root / features_path(split), features=features.features,
                     logits=features.logits, labels=features.labels)


def load_features(split: str, root: Path = Path()) -> Features | PixelFeatures:
    """A split's cached outputs: :class:`Features` (classification) or
    :class:`PixelFeatures` (segmentation, recognised by its ``valid`` array)."""
    arrays = load_npz(root / features_path(split))
    if "valid" in arrays:
        return PixelFeatures(arrays["labels"], arrays["predictions"], arrays["valid"])
    return Features(arrays["features"], arrays["logits"], arrays["labels"])


def save_figure_images(images: np.ndarray, labels: np.ndarray, root: Path = Path()) -> None:
    """Segmentation: the first test images (uint8 (n, H, W, 3)) and label maps (uint8
    (n, H, W), void as stored) at the resolution the model ran at, for the report's
    figure of confidence maps (paper Fig. 5)."""
    atomic_write_npz(root / FIGURE_IMAGES, images=images, labels=labels)


def load_figure_images(root: Path = Path()) -> tuple[np.ndarray, np.ndarray]:
    arrays = load_npz(root / FIGURE_IMAGES)
    return arrays["images"], arrays["labels"]


def load_scores() -> dict[str, dict[str, np.ndarray]]:
    """Every method's confidence scores, ``{method: {split: scores}}``: the baselines'
    files, then ConfidNet's two phases."""
    files = [*sorted(BASELINE_SCORES.glob("*.npz")), CONFIDNET_SCORES, FINETUNED_SCORES]
    return {path.stem: load_npz(path) for path in files}
