"""Unit tests for ``pipeline.data`` (digits prepare / load round trip, seeded stratified
splits, normalisation) and ``pipeline.io`` (atomic writes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from pipeline.data import DATASETS, SPLITS, load_dataset, split_indices
from pipeline.io import (
    atomic_path,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_npz,
    atomic_write_text,
    load_npz,
)

DATA_PARAMS = {"test_fraction": 0.3, "val_fraction": 0.1}
N_DIGITS = 1797


def _prepare(folder: Path, seed: int, data_params: dict | None = None) -> dict:
    return DATASETS["digits"].prepare(folder, data_params or DATA_PARAMS, seed)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("digits_seed0")
    return folder, _prepare(folder, seed=0)


def _indices(folder: Path) -> dict[str, np.ndarray]:
    arrays = load_npz(folder / "dataset.npz")
    return {s: arrays[f"{s}_idx"] for s in SPLITS}


def _leftover_temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------- digits


def test_prepare_writes_files_and_info(prepared) -> None:
    folder, info = prepared
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.npz", "split.json"]
    assert json.loads((folder / "split.json").read_text()) == info
    assert info["dataset"] == "digits" and info["num_classes"] == 10
    assert info["input_shape"] == [1, 8, 8]
    assert sum(info["sizes"].values()) == N_DIGITS
    # sklearn rounds the test share up: ceil(0.3 * 1797) = 540; ceil(0.1 * 1257) = 126
    assert info["sizes"] == {"train": 1131, "val": 126, "test": 540}
    assert _leftover_temp_files(folder) == []


def test_load_round_trip(prepared) -> None:
    folder, info = prepared
    dataset = load_dataset(folder)
    assert dataset.name == "digits" and dataset.num_classes == 10
    assert dataset.input_shape == (1, 8, 8)
    assert sum(len(dataset[s]) for s in SPLITS) == N_DIGITS
    digits = load_digits()
    idx = _indices(folder)
    norm = info["normalisation"]
    for s in SPLITS:
        split = dataset[s]
        assert split.x.shape == (info["sizes"][s], 1, 8, 8)
        assert split.x.dtype == torch.float32 and split.y.dtype == torch.int64
        np.testing.assert_array_equal(split.y.numpy(), digits.target[idx[s]])
        # undo the normalisation: the raw 0..16 pixels of exactly these images come back
        raw = (split.x.numpy()[:, 0] * norm["std"] + norm["mean"]) * norm["scale"]
        np.testing.assert_allclose(raw, digits.images[idx[s]], atol=1e-4)


def test_splits_disjoint_and_cover_everything(prepared) -> None:
    folder, _ = prepared
    idx = _indices(folder)
    together = np.concatenate([idx[s] for s in SPLITS])
    assert len(together) == N_DIGITS
    np.testing.assert_array_equal(np.sort(together), np.arange(N_DIGITS))
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not set(idx[a]) & set(idx[b])


def test_splits_are_stratified(prepared) -> None:
    folder, _ = prepared
    labels = load_digits().target
    overall = np.bincount(labels, minlength=10) / len(labels)
    for s, indices in _indices(folder).items():
        counts = np.bincount(labels[indices], minlength=10)
        assert np.all(counts > 0), s  # every class in every split
        # proportions follow the whole set to within a sample or two per class
        np.testing.assert_allclose(counts / counts.sum(), overall, atol=2.5 / counts.sum())


def test_deterministic_for_a_seed_and_different_for_another(prepared,
                                                           tmp_path: Path) -> None:
    folder, info = prepared
    same = _prepare(tmp_path / "again", seed=0)
    other = _prepare(tmp_path / "other", seed=1)
    assert same == info
    first, again, different = _indices(folder), _indices(tmp_path / "again"), _indices(
        tmp_path / "other")
    for s in SPLITS:
        np.testing.assert_array_equal(first[s], again[s])
        assert not np.array_equal(first[s], different[s])
    assert other["sizes"] == info["sizes"]
    assert other["normalisation"]["mean"] != info["normalisation"]["mean"]
    # the file bytes are identical too, so DVC sees no change on a rerun
    assert (folder / "dataset.npz").read_bytes() == (tmp_path / "again" / "dataset.npz"
                                                     ).read_bytes()


def test_normalisation_from_training_split(prepared) -> None:
    folder, _ = prepared
    dataset = load_dataset(folder)
    train = dataset["train"].x.double()
    assert abs(float(train.mean())) < 1e-4
    assert abs(float(train.std(unbiased=False)) - 1.0) < 1e-4
    # the other splits use the training statistics: close to, not exactly, 0 / 1
    for s in ("val", "test"):
        x = dataset[s].x.double()
        assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1.0) < 0.1
        assert abs(float(x.mean())) > 1e-6


def test_split_indices_fractions() -> None:
    labels = np.repeat(np.arange(4), 50)  # 200 samples
    # test: 0.2 * 200 = 40; val: 0.25 of the remaining 160 = 40; train: 120
    idx = split_indices(labels, test_fraction=0.2, val_fraction=0.25, seed=3)
    assert {s: len(v) for s, v in idx.items()} == {"train": 120, "val": 40, "test": 40}
    for s in SPLITS:
        assert np.all(np.diff(idx[s]) > 0)  # sorted, unique
        # exactly stratified: a quarter of each split per class
        assert np.all(np.bincount(labels[idx[s]], minlength=4) == len(idx[s]) // 4)


def test_unknown_dataset_in_split_json(tmp_path: Path) -> None:
    (tmp_path / "split.json").write_text(json.dumps({"dataset": "imagenet"}))
    with pytest.raises(KeyError, match="unknown dataset 'imagenet'; valid: camvid, cifar10, "
                                       "cifar100, digits, mnist, svhn"):
        load_dataset(tmp_path)


# ---------------------------------------------------------------------------- atomic io


def test_atomic_writers_round_trip_without_temp_files(tmp_path: Path) -> None:
    nested = tmp_path / "a" / "b"  # parents are created
    atomic_write_text(nested / "t.txt", "hello\n")
    atomic_write_json(nested / "d.json", {"b": 1, "a": [1.5, None]})
    atomic_write_npz(nested / "x.npz", x=np.arange(5), y=np.eye(2))
    atomic_torch_save(nested / "m.pt", {"w": torch.ones(3)})
    assert (nested / "t.txt").read_text() == "hello\n"
    assert json.loads((nested / "d.json").read_text()) == {"b": 1, "a": [1.5, None]}
    arrays = load_npz(nested / "x.npz")
    np.testing.assert_array_equal(arrays["x"], np.arange(5))
    np.testing.assert_array_equal(arrays["y"], np.eye(2))
    assert torch.equal(torch.load(nested / "m.pt", weights_only=True)["w"], torch.ones(3))
    assert sorted(p.name for p in nested.iterdir()) == ["d.json", "m.pt", "t.txt", "x.npz"]


def test_torch_save_gives_the_same_bytes_for_the_same_tensors(tmp_path: Path) -> None:
    """Weights are DVC outputs: the same state gives the same file, whatever its name and
    however often it is written (torch named the archive after the random temporary file)."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    state = model.state_dict()
    atomic_torch_save(tmp_path / "one" / "classifier.pt", state)
    first = (tmp_path / "one" / "classifier.pt").read_bytes()
    atomic_torch_save(tmp_path / "one" / "classifier.pt", state)
    atomic_torch_save(tmp_path / "two" / "confidnet.pt", state)
    assert (tmp_path / "one" / "classifier.pt").read_bytes() == first
    assert (tmp_path / "two" / "confidnet.pt").read_bytes() == first

    loaded = torch.load(tmp_path / "two" / "confidnet.pt", map_location="cpu",
                        weights_only=True)
    assert list(loaded) == list(state)
    for key, tensor in state.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    fresh.load_state_dict(loaded)  # strict: every key, with the modules' version metadata
    assert loaded._metadata == state._metadata  # type: ignore[attr-defined]
    atomic_torch_save(tmp_path / "again.pt", fresh.state_dict())
    assert (tmp_path / "again.pt").read_bytes() == first


def test_atomic_overwrite_replaces_content(tmp_path: Path) -> None:
    target = tmp_path / "f.json"
    atomic_write_json(target, {"v": 1})
    atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 2}
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_path_exception_keeps_target_intact(tmp_path: Path) -> None:
    target = tmp_path / "result.txt"
    target.write_text("original")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        tmp.write_text("half-written")
        raise RuntimeError("boom")
    assert target.read_text() == "original"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_path_exception_creates_no_target(tmp_path: Path) -> None:
    target = tmp_path / "new.npz"
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt  # a killed stage, not only an ordinary error
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_npz_failure_mid_write(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "arrays.npz"
    atomic_write_npz(target, x=np.arange(3))
    before = target.read_bytes()

    def failing_savez(handle, **arrays):
        handle.write(b"PK\x03\x04 truncated")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_npz(target, x=np.arange(10))
    assert target.read_bytes() == before
    assert _leftover_temp_files(tmp_path) == [] and list(tmp_path.iterdir()) == [target]
