"""Where the stages put things. ``dvc.yaml`` declares the same paths; keep them in step."""

from __future__ import annotations

from pathlib import Path

DATA = Path("data")
MODELS = Path("models")
CLASSIFIER = MODELS / "classifier.pt"
CONFIDNET = MODELS / "confidnet.pt"
CONFIDNET_FINETUNED = MODELS / "confidnet_finetuned.pt"
FEATURES = Path("features")
SCORES = Path("scores")
BASELINE_SCORES = SCORES / "baselines"
CONFIDNET_SCORES = SCORES / "confidnet.npz"
FINETUNED_SCORES = SCORES / "confidnet_finetuned.npz"
METRICS = Path("metrics")
PLOTS = Path("plots")
RUNS = Path("runs")
REPORTS = Path("reports")
REPORT = REPORTS / "report.md"
FIGURES = REPORTS / "figures"


def features_path(split: str) -> Path:
    return FEATURES / f"{split}.npz"


def run_record_path(stage: str) -> Path:
    return RUNS / f"{stage}.json"
