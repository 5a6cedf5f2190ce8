"""Datasets behind a registry, and the on-disk format the stages exchange.

A dataset entry knows how to *prepare* itself into a folder (download, checksum, split)
and how to *load* that folder back as normalised tensors. Every later stage reads the
prepared folder only, so the network is touched once, in the ``download`` stage.

The embedded default ``digits`` is scikit-learn's copy of the UCI handwritten digits
(8x8 images, 1,797 samples, 10 classes): it needs no network.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.io import atomic_write_json, atomic_write_npz
from pipeline.registry import Registry

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """One split as tensors: ``x`` normalised float inputs, ``y`` integer labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Dataset:
    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    splits: dict[str, Split]

    def __getitem__(self, split: str) -> Split:
        return self.splits[split]


@dataclass(frozen=True)
class DatasetEntry:
    """How to prepare a dataset into a folder and load it back."""

    prepare: Callable[[Path, dict[str, Any], int], dict[str, Any]]
    load: Callable[[Path], Dataset]
    num_classes: int
    input_shape: tuple[int, ...]


DATASETS: Registry[DatasetEntry] = Registry("dataset")


def split_indices(
    labels: np.ndarray, test_fraction: float, val_fraction: float, seed: int
) -> dict[str, np.ndarray]:
    """Seeded, stratified train/val/test indices.

    ``val_fraction`` is a fraction of what remains after the test split, as in the
    authors' ``valid_size: 0.1`` of the training set.
    """
    from sklearn.model_selection import train_test_split

    all_idx = np.arange(len(labels))
    train_val, test = train_test_split(
        all_idx, test_size=test_fraction, random_state=seed, stratify=labels
    )
    train, val = train_test_split(
        train_val, test_size=val_fraction, random_state=seed, stratify=labels[train_val]
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def _prepare_digits(out_dir: Path, data_params: dict[str, Any], seed: int) -> dict[str, Any]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)  # values 0..16
    labels = digits.target.astype(np.int64)
    idx = split_indices(labels, data_params["test_fraction"], data_params["val_fraction"], seed)
    # One scalar mean/std from the training split, as MNIST's 0.1307 / 0.3081 are.
    train_pixels = images[idx["train"]].astype(np.float64) / 16.0
    mean, std = float(train_pixels.mean()), float(train_pixels.std())
    atomic_write_npz(out_dir / "dataset.npz", images=images, labels=labels, **{
        f"{s}_idx": idx[s] for s in SPLITS
    })
    info = {
        "dataset": "digits",
        "seed": seed,
        "num_classes": 10,
        "input_shape": [1, 8, 8],
        "normalisation": {"scale": 16.0, "mean": mean, "std": std},
        "sizes": {s: len(idx[s]) for s in SPLITS},
        "test_fraction": data_params["test_fraction"],
        "val_fraction": data_params["val_fraction"],
    }
    atomic_write_json(out_dir / "split.json", info)
    return info


def _load_digits(folder: Path) -> Dataset:
    info = json.loads((folder / "split.json").read_text())
    with np.load(folder / "dataset.npz") as arrays:
        images, labels = arrays["images"], arrays["labels"]
        norm = info["normalisation"]
        x_all = (images.astype(np.float32) / norm["scale"] - norm["mean"]) / norm["std"]
        splits = {
            s: Split(
                x=torch.from_numpy(x_all[arrays[f"{s}_idx"]][:, None]),
                y=torch.from_numpy(labels[arrays[f"{s}_idx"]]),
            )
            for s in SPLITS
        }
    return Dataset("digits", info["num_classes"], tuple(info["input_shape"]), splits)


DATASETS.register("digits")(
    DatasetEntry(prepare=_prepare_digits, load=_load_digits, num_classes=10, input_shape=(1, 8, 8))
)


def load_dataset(folder: Path) -> Dataset:
    """Load a folder written by the ``download`` stage, whatever the dataset."""
    info = json.loads((folder / "split.json").read_text())
    return DATASETS[info["dataset"]].load(folder)
