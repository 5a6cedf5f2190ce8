"""Same params and seed, two fresh projects, one `dvc repro` each: byte-identical metrics
and report on CPU (see README, "Determinism"; GPU runs need tolerances).

The twins (conftest.twin_projects: the session's baseline, and a `git clone` of it reproduced
from an empty cache) differ in one way: one tracks to MLflow, the other's store is
unreachable. So this also shows that tracking never changes a result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import Reproduced

pytestmark = pytest.mark.slow


def files(project: Path, pattern: str) -> list[str]:
    return sorted(str(p.relative_to(project)) for p in project.glob(pattern))


def test_outputs_identical_across_fresh_runs(twin_projects: dict[str, Reproduced]) -> None:
    a, b = twin_projects["tracked"].path, twin_projects["offline"].path
    assert a != b

    # every metrics file, per-epoch / evaluation curve and run record, byte for byte (the
    # records hold what was logged, not where), and the report with its figures, though the
    # twins differ in path and in MLflow run ids
    for pattern in ("metrics/*.json", "plots/*.csv", "data/*", "runs/*.json",
                    "reports/report.md", "reports/figures/*.png"):
        names = files(a, pattern)
        assert names and names == files(b, pattern), pattern
        for name in names:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name

    # scores and features: same arrays, same dtypes, NaN where NaN
    for pattern in ("scores/**/*.npz", "features/*.npz"):
        names = files(a, pattern)
        assert names and names == files(b, pattern), pattern
        for name in names:
            with np.load(a / name) as left, np.load(b / name) as right:
                assert left.files == right.files, name
                for key in left.files:
                    assert left[key].dtype == right[key].dtype, (name, key)
                    np.testing.assert_array_equal(left[key], right[key], err_msg=f"{name}:{key}")

    # model weights, tensor for tensor and byte for byte (they are hashed into dvc.lock)
    names = files(a, "models/*.pt")
    assert names and names == files(b, "models/*.pt")
    for name in names:
        assert_same(torch.load(a / name, map_location="cpu", weights_only=True),
                    torch.load(b / name, map_location="cpu", weights_only=True), name)
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def assert_same(left: Any, right: Any, where: str) -> None:
    if isinstance(left, torch.Tensor):
        assert isinstance(right, torch.Tensor) and left.dtype == right.dtype, where
        assert torch.equal(left, right), where
    elif isinstance(left, dict):
        assert isinstance(right, dict) and list(left) == list(right), where
        for key in left:
            assert_same(left[key], right[key], f"{where}:{key}")
    elif isinstance(left, (list, tuple)):
        assert type(left) is type(right) and len(left) == len(right), where
        for i, (x, y) in enumerate(zip(left, right, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert left == right, where
