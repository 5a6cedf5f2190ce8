"""benchmarks/gpu_check.sh in its CPU smoke mode: the whole script (epoch times of every
setting, CamVid's SegNet on tiny synthetic images included, the Table 1 projection, every
stage of the MNIST MLP preset on MNIST archives), on fake MNIST archives, in seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fake_datasets import write_dataset

from pipeline.artifacts import STAGE_ORDER
from pipeline.settings import preset_names

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_the_whole_script(tmp_path: Path) -> None:
    mirror = tmp_path / "mnist"
    write_dataset("mnist", mirror)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke",
                           str(mirror)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, check=False, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    assert (out / "gpu_check.md").read_text() == text
    # every setting but the digits default has figures, CamVid's SegNet included
    settings = [s for s in preset_names("setting", REPO) if s != "digits_mlp"]
    assert "camvid_segnet" in settings
    for setting in settings:
        row = next(line for line in text.splitlines() if line.startswith(f"| {setting} |"))
        assert "skipped" not in row, row
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        # classifier, phase 1 (its path in brackets), fine-tuning: seconds per epoch
        for cell in (cells[2], cells[3].split(" (")[0], cells[4]):
            assert float(cell) > 0, row
    camvid = next(line for line in text.splitlines() if line.startswith("| camvid_segnet |"))
    assert "per pixel" in camvid  # phase 1 through the frozen SegNet, targets per pixel
    assert "segmentation images scaled by 0.1" in text
    assert "GPU-hours over the measured settings" in text
    for stage in STAGE_ORDER:
        assert f"  {stage}: " in text
    result = json.loads((out / "gpu_check.json").read_text())
    assert list(result["full_run"]["seconds"]) == list(STAGE_ORDER)
    assert "test/confidnet/aupr_err" in result["full_run"]["headline"]
    assert {t["setting"] for t in result["timings"] if not t["skipped"]} == set(settings)
    # the projection sums every setting's seeds x epochs x epoch times, CamVid's included
    seeds, hours = 3, 0.0
    for t in result["timings"]:
        seconds = (t["classifier"], t["phase1"], t["finetune"])
        assert all(value > 0 for value in seconds), t
        hours += seeds * sum(e * s for e, s in zip(t["epochs"], seconds, strict=True)) / 3600
    camvid = next(t for t in result["timings"] if t["setting"] == "camvid_segnet")
    assert camvid["epochs"] == [500, 500, 20]
    assert result["table1_gpu_hours"]["fp32"] == pytest.approx(hours)


def test_gpu_check_names_what_the_mirror_lacks(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out")}
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--smoke",
                           str(tmp_path), "--", "--settings", "mnist_mlp"], env=env,
                          capture_output=True, text=True, check=False, timeout=600)
    assert done.returncode != 0
    assert "lacks train-images-idx3-ubyte.gz" in done.stdout + done.stderr
