"""Stage 1: prepare the dataset (download, checksum, seeded split) into ``data/``."""

from __future__ import annotations

# First: under DVC, starts this stage's MLflow process while the imports below run.
import pipeline.early_tracking  # noqa: F401

# isort: split
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.artifacts import DATA
from pipeline.data import DATASETS
from pipeline.stage import run_stage_process
from pipeline.tracking import StageRun


def body(params: dict[str, Any], run: StageRun) -> None:
    entry = DATASETS[params["dataset"]]
    # Prepare in a sibling folder and swap it in, so an interrupted download never
    # leaves a data/ that looks complete.
    staging = Path(tempfile.mkdtemp(prefix=".data-", dir="."))
    try:
        info = entry.prepare(staging, params["data"], params["seed"])
        shutil.rmtree(DATA, ignore_errors=True)
        staging.rename(DATA)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    run.log_metrics({f"{split}_size": size for split, size in info["sizes"].items()})
    run.log_artifact(DATA / "split.json")


if __name__ == "__main__":
    # The datasets are prepared with numpy (torchvision only fetches archives): no device.
    run_stage_process("download", body, uses_torch=False)
