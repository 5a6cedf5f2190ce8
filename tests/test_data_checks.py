"""A prepared dataset that is truncated, overwritten or inconsistent stops with one message
naming the file and the fix (``pipeline.data.DataError``), in the loader and in a stage."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import REPO, fast_params, subprocess_env, write_conf

from pipeline.data import DATASETS, DataError, load_dataset
from pipeline.io import load_npz

FIX = "delete {folder}/ and run `dvc repro download` (or `dvc pull`)"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pristine") / "data"
    DATASETS["digits"].prepare(folder, {"test_fraction": 0.3, "val_fraction": 0.1}, 0)
    return folder


@pytest.fixture
def data(pristine: Path, tmp_path: Path) -> Path:
    """A good copy of the prepared digits folder, for the test to break."""
    folder = tmp_path / "data"
    shutil.copytree(pristine, folder)
    return folder


def rewrite_npz(path: Path, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    arrays = load_npz(path)
    change(arrays)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def rewrite_json(path: Path, change: Callable[[dict], None]) -> None:
    info = json.loads(path.read_text())
    change(info)
    path.write_text(json.dumps(info))


def expect_error(folder: Path, file: str, *fragments: str) -> DataError:
    with pytest.raises(DataError) as caught:
        load_dataset(folder)
    message = str(caught.value)
    assert f"{folder / file}:" in message, message
    assert FIX.format(folder=folder.as_posix()) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return caught.value


def test_good_copy_loads(data: Path) -> None:
    assert len(load_dataset(data)["train"]) == 1131


# --- unreadable files ---------------------------------------------------------------------


def test_truncated_npz(data: Path) -> None:
    path = data / "dataset.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    expect_error(data, "dataset.npz", "truncated")


def test_npz_with_corrupt_bytes_inside_an_array(data: Path) -> None:
    # the zip directory is intact, one member's data is not: its CRC catches it on reading
    path = data / "dataset.npz"
    raw = bytearray(path.read_bytes())
    start = raw.find(b"test_idx.npy") + 300  # inside the member, after its local header
    raw[start:start + 64] = b"\x07" * 64
    path.write_bytes(bytes(raw))
    expect_error(data, "dataset.npz", "Bad CRC-32 for file 'test_idx.npy'")


def test_garbage_npz(data: Path) -> None:
    (data / "dataset.npz").write_bytes(b"\x89garbage, not a zip archive" * 40)
    expect_error(data, "dataset.npz", "not an .npz")


def test_empty_npz(data: Path) -> None:
    (data / "dataset.npz").write_bytes(b"")
    expect_error(data, "dataset.npz")


def test_missing_npz(data: Path) -> None:
    (data / "dataset.npz").unlink()
    expect_error(data, "dataset.npz", "missing")


def test_npz_without_an_array(data: Path) -> None:
    rewrite_npz(data / "dataset.npz", lambda a: a.pop("val_idx"))
    expect_error(data, "dataset.npz", "missing arrays val_idx")


def test_missing_split_json(data: Path) -> None:
    (data / "split.json").unlink()
    expect_error(data, "split.json", "missing")


def test_truncated_split_json(data: Path) -> None:
    path = data / "split.json"
    path.write_text(path.read_text()[:40])
    expect_error(data, "split.json", "JSONDecodeError")


def test_split_json_without_a_field(data: Path) -> None:
    rewrite_json(data / "split.json", lambda info: info.pop("normalisation"))
    expect_error(data, "split.json", "'normalisation'")


def test_unknown_dataset_is_a_data_error_and_a_key_error(data: Path) -> None:
    rewrite_json(data / "split.json", lambda info: info.update(dataset="imagenet"))
    error = expect_error(data, "split.json", "unknown dataset 'imagenet'; valid: camvid, "
                         "cifar10, cifar100, digits, mnist, svhn")
    assert isinstance(error, KeyError)


# --- readable but wrong -------------------------------------------------------------------


def test_label_out_of_range(data: Path) -> None:
    def relabel(arrays: dict[str, np.ndarray]) -> None:
        arrays["labels"][arrays["train_idx"][0]] = 10

    rewrite_npz(data / "dataset.npz", relabel)
    expect_error(data, "dataset.npz", "train split", "labels in [0, 10]", "outside [0, 10)")


def test_negative_label(data: Path) -> None:
    def relabel(arrays: dict[str, np.ndarray]) -> None:
        arrays["labels"][arrays["test_idx"][3]] = -1

    rewrite_npz(data / "dataset.npz", relabel)
    expect_error(data, "dataset.npz", "test split", "labels in [-1, 9]")


def test_float_labels(data: Path) -> None:
    rewrite_npz(data / "dataset.npz", lambda a: a.update(labels=a["labels"].astype(float)))
    expect_error(data, "dataset.npz", "torch.float64", "expected torch.float32 and torch.int64")


def test_split_sizes_disagree_with_split_json(data: Path) -> None:
    rewrite_json(data / "split.json", lambda info: info["sizes"].update(val=127))
    expect_error(data, "dataset.npz", "val split has 126 samples",
                 f"{data / 'split.json'} records 127")


def test_split_shorter_than_recorded(data: Path) -> None:
    rewrite_npz(data / "dataset.npz", lambda a: a.update(test_idx=a["test_idx"][:-5]))
    expect_error(data, "dataset.npz", "test split has 535 samples", "records 540")


def test_index_out_of_range(data: Path) -> None:
    def shift(arrays: dict[str, np.ndarray]) -> None:
        arrays["val_idx"][-1] = 1797

    rewrite_npz(data / "dataset.npz", shift)
    expect_error(data, "dataset.npz", "val_idx", "out of range for 1797 samples")


def test_overlapping_splits(data: Path) -> None:
    def leak(arrays: dict[str, np.ndarray]) -> None:
        arrays["test_idx"][0] = arrays["train_idx"][0]

    rewrite_npz(data / "dataset.npz", leak)
    expect_error(data, "dataset.npz", "overlap")


def test_non_finite_inputs(data: Path) -> None:
    def poison(arrays: dict[str, np.ndarray]) -> None:
        images = arrays["images"].astype(np.float64)
        images[arrays["val_idx"][0], 2, 3] = np.nan
        arrays["images"] = images

    rewrite_npz(data / "dataset.npz", poison)
    expect_error(data, "dataset.npz", "val split", "NaN or infinite")


def test_wrong_image_shape(data: Path) -> None:
    rewrite_npz(data / "dataset.npz", lambda a: a.update(images=a["images"].reshape(-1, 64)))
    expect_error(data, "dataset.npz", "(1797, 64)", "expected (N, 8, 8)")


def test_input_shape_in_split_json(data: Path) -> None:
    rewrite_json(data / "split.json", lambda info: info.update(input_shape=[1, 28, 28]))
    expect_error(data, "split.json", "input_shape [1, 28, 28]", "[1, 8, 8]")


# --- in a stage ---------------------------------------------------------------------------


def stage_project(tmp_path: Path, pristine: Path) -> Path:
    project = tmp_path / "project"
    shutil.copytree(pristine, project / "data")
    (project / "params.yaml").write_text(yaml.safe_dump(fast_params()))
    write_conf(project)
    # the package data the data-loading stages check for (dvc.yaml deps of those stages)
    shutil.copytree(REPO / "pipeline" / "manifests", project / "pipeline" / "manifests")
    return project


def test_run_stage_exits_2_with_one_message(tmp_path: Path, pristine: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            isolated_mlflow: pytest.MonkeyPatch) -> None:
    import mlflow

    from pipeline.artifacts import DATA
    from pipeline.stage import run_stage

    project = stage_project(tmp_path, pristine)
    rewrite_json(project / "data" / "split.json", lambda info: info["sizes"].update(train=1))
    isolated_mlflow.chdir(project)
    with pytest.raises(SystemExit) as caught:
        run_stage("check_data", lambda params, run: load_dataset(DATA))
    assert caught.value.code == 2
    err = capsys.readouterr().err  # MLflow's own INFO lines may come first
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith("error: data/dataset.npz: train split has 1131 samples"), err
    assert "records 1\n  The prepared dataset is corrupt" in err and "Traceback" not in err
    assert not (project / "runs").exists()
    client = mlflow.MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    # the stage's run, nested under the pipeline's parent run, which fails with it
    [run] = client.search_runs([client.get_experiment_by_name("confidnet").experiment_id],
                               "tags.dvc_stage = 'check_data'")
    assert run.info.status == "FAILED"
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.status == "FAILED"


def test_stage_module_exits_2_without_traceback(tmp_path: Path, pristine: Path) -> None:
    project = stage_project(tmp_path, pristine)
    npz = project / "data" / "dataset.npz"
    npz.write_bytes(npz.read_bytes()[:1000])
    shutil.copy(REPO / "dvc.yaml", project)  # train_classifier fingerprints its deps
    proc = subprocess.run([sys.executable, "-m", "stages.train_classifier"], cwd=project,
                          env=subprocess_env({"PYTHONPATH": str(REPO)}), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "error: data/dataset.npz: unreadable, truncated or not an .npz file" in proc.stderr
    assert "delete data/ and run `dvc repro download` (or `dvc pull`)" in proc.stderr
    assert not (project / "models").exists()
    assert not (project / "runs").exists()
