"""Every ratio benchmark in benchmarks/ runs in --quick mode (tiny sizes) and prints its
table, the same one it writes to --out. No timing is checked: the figures of a quick run
mean nothing, and timed assertions fail on a busy machine."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from conftest import REPO, run, table_rows

# script -> the first cell of each table row it must print
EXPECTED = {
    "training_floor.py": ["mnist_mlp", "svhn_smallconv"],
    "epoch_profile.py": ["classifier (8 of 54,000 images)",
                         "phase 1, cached features (8 of 54,000 images)"],
    "augment_loader.py": ["hflip, rotate_degrees", "hflip, crop_padding"],
    "mc_dropout.py": ["MLP 784-1000-10", "SmallConvNet (MNIST)"],
    "trustscore.py": ["classification", "segmentation, scikit-learn's size",
                      "20,000 x 64, 11 classes"],
}
RATIO = re.compile(r"^\*\*\d+(\.\d+)?x\*\*$")


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_quick_run_prints_its_table(script: str, tmp_path: Path) -> None:
    out = tmp_path / "result.md"
    proc = run(REPO, ["python", f"benchmarks/{script}", "--quick", "--repeats", "1",
                      "--out", str(out)], env={"PYTHONPATH": str(REPO)})
    rows = table_rows(proc.stdout)
    firsts = [row[0] for row in rows]
    for first in EXPECTED[script]:
        assert first in firsts, f"{script}: no row {first!r} in\n{proc.stdout}"
    # the machine line, at least one ratio, and the same tables in the --out file
    assert "cores, torch" in proc.stdout and "load average" in proc.stdout
    assert any(RATIO.match(cell) for row in rows for cell in row), proc.stdout
    assert table_rows(out.read_text()) == rows
