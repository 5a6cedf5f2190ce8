"""The stages' array outputs as later stages read them: the frozen classifier's cached
penultimate features, logits and labels (``features/``, written once by
``extract_features``) and every method's confidence scores (``scores/``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import BASELINE_SCORES, CONFIDNET_SCORES, FINETUNED_SCORES, features_path
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
    """One split's outputs. Classification: a row per sample. Segmentation: a row per
    labelled (non-void) pixel, images in order, each row-major; no features or logits
    (zero-width), the predictions stored, and ``valid`` (images, H, W) saying which pixels
    those are."""

    features: np.ndarray  # (N, D); (P, 0) for segmentation
    logits: np.ndarray  # (N, K); (P, 0) for segmentation
    labels: np.ndarray  # (N,) or (P,)
    stored_predictions: np.ndarray | None = None  # (P,), segmentation only
    valid: np.ndarray | None = None  # (images, H, W) bool, segmentation only

    @property
    def predictions(self) -> np.ndarray:
        if self.stored_predictions is not None:
            return self.stored_predictions
        return self.logits.argmax(axis=1)

    @property
    def groups(self) -> np.ndarray | None:
        """The image of each pixel (int32, (P,)) for segmentation; None for classification."""
        if self.valid is None:
            return None
        per_image = self.valid.reshape(self.valid.shape[0], -1).sum(axis=1)
        return np.repeat(np.arange(self.valid.shape[0], dtype=np.int32), per_image)

    @property
    def correct(self) -> np.ndarray:
        return (self.predictions == self.labels).astype(np.int64)


def save_features(split: str, features: Features, root: Path = Path()) -> None:
    atomic_write_npz(root / features_path(split), features=features.features,
                     logits=features.logits, labels=features.labels)


def load_features(split: str, root: Path = Path()) -> Features:
    arrays = load_npz(root / features_path(split))
    if "valid" in arrays:
        pixels = arrays["labels"].shape[0]
        empty = np.empty((pixels, 0), dtype=np.float32)
        return Features(empty, empty, arrays["labels"], arrays["predictions"], arrays["valid"])
    return Features(arrays["features"], arrays["logits"], arrays["labels"])


def load_scores() -> dict[str, dict[str, np.ndarray]]:
    """Every method's confidence scores, ``{method: {split: scores}}``: the baselines'
    files, then ConfidNet's two phases."""
    files = [*sorted(BASELINE_SCORES.glob("*.npz")), CONFIDNET_SCORES, FINETUNED_SCORES]
    return {path.stem: load_npz(path) for path in files}
