"""The stages' array outputs as later stages read them: the frozen classifier's cached
penultimate features, logits and labels (``features/``, written once by
``extract_features``) and every method's confidence scores (``scores/``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.artifacts import BASELINE_SCORES, CONFIDNET_SCORES, FINETUNED_SCORES, features_path
from pipeline.io import atomic_write_npz, load_npz


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


def save_features(split: str, features: Features, root: Path = Path()) -> None:
    atomic_write_npz(root / features_path(split), features=features.features,
                     logits=features.logits, labels=features.labels)


def load_features(split: str, root: Path = Path()) -> Features:
    arrays = load_npz(root / features_path(split))
    return Features(arrays["features"], arrays["logits"], arrays["labels"])


def load_scores() -> dict[str, dict[str, np.ndarray]]:
    """Every method's confidence scores, ``{method: {split: scores}}``: the baselines'
    files, then ConfidNet's two phases."""
    files = [*sorted(BASELINE_SCORES.glob("*.npz")), CONFIDNET_SCORES, FINETUNED_SCORES]
    return {path.stem: load_npz(path) for path in files}
