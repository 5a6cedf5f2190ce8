"""Datasets behind a registry, and the on-disk format the stages exchange.

A dataset entry knows how to *prepare* itself into a folder (download, checksum, split)
and how to *load* that folder back as normalised tensors. Every later stage reads the
prepared folder only, so the network is touched once, in the ``download`` stage.

The embedded default ``digits`` is scikit-learn's copy of the UCI handwritten digits
(8x8 images, 1,797 samples, 10 classes): it needs no network. The paper's datasets (MNIST,
SVHN, CIFAR-10, CIFAR-100) are registered by :mod:`pipeline.image_datasets`, imported at
the end of this module so the registry is always complete.

Loading checks what it reads: a file that cannot be read, or a dataset whose shapes, dtypes,
labels, indices or split sizes disagree with ``split.json``, raises :class:`DataError`
naming the file and the fix, never a bare numpy or zipfile traceback.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.io import atomic_write_json, atomic_write_npz
from pipeline.registry import Registry

SPLITS = ("train", "val", "test")

# What breaks when a file is truncated, overwritten or half-downloaded: np.load and
# json.loads raise these (KeyError for a missing array or field).
READ_ERRORS = (zipfile.BadZipFile, EOFError, ValueError, KeyError, OSError)


class DataError(Exception):
    """A prepared dataset folder that cannot be used: unreadable, truncated or
    inconsistent. The message names the file and how to get a good copy back."""

    def __init__(self, path: Path | str, problem: str, fix: str | None = None) -> None:
        self.path = Path(path)
        self.problem = problem
        folder = self.path.parent if self.path.suffix else self.path
        if fix is None:
            fix = (f"The prepared dataset is corrupt or incomplete: delete {folder.as_posix()}/ "
                   "and run `dvc repro download` (or `dvc pull`).")
        super().__init__(f"{self.path}: {problem}\n  {fix}")


class UnknownDatasetError(DataError, KeyError):
    """``split.json`` names a dataset this code does not register (also a ``KeyError``,
    as the registry lookup raised before)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def read_json(path: Path) -> Any:
    """A JSON file, or :class:`DataError` naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(path, "missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(path, f"unreadable ({type(error).__name__}: {error})") from None


def read_npz(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an ``.npz`` file, read in full (a truncated member fails
    here, not later), or :class:`DataError` naming the file."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            missing = [key for key in keys if key not in arrays.files]
            if missing:
                raise DataError(path, f"missing arrays {', '.join(missing)} "
                                      f"(has: {', '.join(arrays.files) or 'none'})")
            return {key: np.asarray(arrays[key]) for key in keys}
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(path, "missing") from None
    except READ_ERRORS as error:
        raise DataError(path, f"unreadable, truncated or not an .npz file "
                              f"({type(error).__name__}: {error})") from None


@dataclass(frozen=True)
class Split:
    """One split as tensors: ``x`` normalised float inputs, ``y`` integer labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset. ``pad_value`` is the normalised value of a black pixel per channel
    (``-mean / std``), what augmentation fills padded and rotated-in pixels with."""

    name: str
    num_classes: int
    input_shape: tuple[int, ...]
    splits: dict[str, Split]
    pad_value: tuple[float, ...] = (0.0,)

    def __getitem__(self, split: str) -> Split:
        return self.splits[split]


@dataclass(frozen=True)
class DatasetEntry:
    """How to prepare a dataset into a folder and load it back."""

    prepare: Callable[[Path, dict[str, Any], int], dict[str, Any]]
    load: Callable[[Path], Dataset]
    num_classes: int
    input_shape: tuple[int, ...]
    # The file, in the prepared folder, that the arrays come from: named by the checks.
    data_file: str = "dataset.npz"


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


def resolve_split_seed(data_params: dict[str, Any], seed: int) -> int:
    """The seed of the train/val(/test) split: ``data.split_seed``, or the top-level
    ``seed`` when it is null (or absent)."""
    split_seed = data_params.get("split_seed")
    return seed if split_seed is None else int(split_seed)


def normalise(images: np.ndarray, scale: float, mean: float | Sequence[float],
              std: float | Sequence[float]) -> np.ndarray:
    """``(images / scale - mean) / std`` as float32, computed in place in the one float copy
    of ``images``. A scalar ``mean`` and ``std`` apply to every pixel; sequences apply per
    channel, along axis 1 of ``(N, C, H, W)`` images."""
    x = images.astype(np.float32)
    x /= scale
    if isinstance(mean, (int, float)) and isinstance(std, (int, float)):
        x -= mean
        x /= std
    else:
        shape = (1, -1, *([1] * (x.ndim - 2)))
        x -= np.asarray(mean, dtype=np.float32).reshape(shape)
        x /= np.asarray(std, dtype=np.float32).reshape(shape)
    return x


def checked_split_indices(arrays: dict[str, np.ndarray], n: int,
                          path: Path) -> dict[str, np.ndarray]:
    """The ``{split}_idx`` arrays of ``arrays``: integer, in range for ``n`` samples and
    disjoint, or :class:`DataError` naming ``path``."""
    indices = {s: check_indices(arrays[f"{s}_idx"], n, path, f"{s}_idx") for s in SPLITS}
    together = np.concatenate(list(indices.values()))
    if len(np.unique(together)) != len(together):
        raise DataError(path, "the train, val and test indices overlap (or repeat a sample)")
    return indices


def _prepare_digits(out_dir: Path, data_params: dict[str, Any], seed: int) -> dict[str, Any]:
    """sklearn's digits, split by :func:`split_indices` with ``data.split_seed`` (null:
    ``seed``) and normalised by the training split's mean and std."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.uint8)  # values 0..16
    labels = digits.target.astype(np.int64)
    split_seed = resolve_split_seed(data_params, seed)
    idx = split_indices(labels, data_params["test_fraction"], data_params["val_fraction"],
                        split_seed)
    # One scalar mean/std from the training split, as MNIST's 0.1307 / 0.3081 are.
    train_pixels = images[idx["train"]].astype(np.float64) / 16.0
    mean, std = float(train_pixels.mean()), float(train_pixels.std())
    atomic_write_npz(out_dir / "dataset.npz", images=images, labels=labels, **{
        f"{s}_idx": idx[s] for s in SPLITS
    })
    info = {
        "dataset": "digits",
        "seed": seed,
        "split_seed": split_seed,
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
    info_path, path = folder / "split.json", folder / "dataset.npz"
    info = read_json(info_path)
    arrays = read_npz(path, ["images", "labels", *(f"{s}_idx" for s in SPLITS)])
    images, labels = arrays["images"], arrays["labels"]
    if images.shape[1:] != (8, 8) or labels.shape != (len(images),):
        raise DataError(path, f"images of shape {images.shape} and labels of shape "
                              f"{labels.shape}; expected (N, 8, 8) and (N,)")
    indices = checked_split_indices(arrays, len(images), path)
    norm = _field(info, info_path, "normalisation")
    try:
        scale, mean, std = (float(norm[k]) for k in ("scale", "mean", "std"))
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(info_path, f"bad normalisation {norm!r} "
                                   f"({type(error).__name__}: {error})") from None
    # Each split normalised from its own uint8 subset: one float copy of the data in all.
    splits = {
        s: Split(x=torch.from_numpy(normalise(images[idx], scale, mean, std)[:, None]),
                 y=torch.from_numpy(labels[idx]))
        for s, idx in indices.items()
    }
    pad_value = tuple(float(v) for v in normalise(np.zeros(1, np.uint8), scale, mean, std))
    return Dataset("digits", _field(info, info_path, "num_classes"),
                   tuple(_field(info, info_path, "input_shape")), splits, pad_value)


def check_indices(idx: np.ndarray, n: int, path: Path, name: str) -> np.ndarray:
    """Integer indices into ``n`` samples, or :class:`DataError` naming ``path``."""
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise DataError(path, f"{name} must be a 1-d integer array, got {idx.dtype} "
                              f"of shape {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise DataError(path, f"{name} holds indices in [{idx.min()}, {idx.max()}], out of "
                              f"range for {n} samples")
    return idx


DATASETS.register("digits")(
    DatasetEntry(prepare=_prepare_digits, load=_load_digits, num_classes=10, input_shape=(1, 8, 8))
)


def _field(info: Any, path: Path, key: str) -> Any:
    if not isinstance(info, dict) or key not in info:
        raise DataError(path, f"no {key!r} field")
    return info[key]


def load_dataset(folder: Path) -> Dataset:
    """Load a folder written by the ``download`` stage, whatever the dataset, and check
    it (:func:`check_dataset`). Any problem raises :class:`DataError`."""
    folder = Path(folder)
    info_path = folder / "split.json"
    info = read_json(info_path)
    name = _field(info, info_path, "dataset")
    try:
        entry = DATASETS[name]
    except KeyError as error:
        raise UnknownDatasetError(info_path, str(error.args[0])) from None
    try:
        dataset = entry.load(folder)
    except DataError:
        raise
    except READ_ERRORS as error:  # a loader that does not check its own files
        raise DataError(folder / entry.data_file,
                        f"cannot be loaded ({type(error).__name__}: {error})") from None
    check_dataset(dataset, entry, info, folder)
    return dataset


def check_dataset(dataset: Dataset, entry: DatasetEntry, info: dict[str, Any],
                  folder: Path) -> None:
    """What every stage relies on, against the registry entry and ``split.json``: float32
    finite inputs of shape ``(N, *input_shape)``, int64 labels in ``[0, num_classes)``,
    and split sizes as ``split.json`` records them."""
    info_path, path = folder / "split.json", folder / entry.data_file
    if list(_field(info, info_path, "input_shape")) != list(entry.input_shape):
        raise DataError(info_path, f"input_shape {info['input_shape']}, but dataset "
                                   f"{dataset.name!r} has {list(entry.input_shape)}")
    if _field(info, info_path, "num_classes") != entry.num_classes:
        raise DataError(info_path, f"num_classes {info['num_classes']}, but dataset "
                                   f"{dataset.name!r} has {entry.num_classes}")
    sizes = _field(info, info_path, "sizes")
    if not isinstance(sizes, dict) or sorted(sizes) != sorted(SPLITS):
        raise DataError(info_path, f"sizes must give {', '.join(SPLITS)}; got {sizes!r}")
    for s in SPLITS:
        if s not in dataset.splits:
            raise DataError(path, f"no {s} split")
        x, y = dataset[s].x, dataset[s].y
        if x.dtype != torch.float32 or y.dtype != torch.int64:
            raise DataError(path, f"{s} split: inputs {x.dtype} and labels {y.dtype}; "
                                  "expected torch.float32 and torch.int64")
        if tuple(x.shape) != (len(y), *entry.input_shape):
            raise DataError(path, f"{s} split: inputs of shape {tuple(x.shape)} for "
                                  f"{len(y)} labels; expected {(len(y), *entry.input_shape)}")
        if len(y) != sizes[s]:
            raise DataError(path, f"{s} split has {len(y)} samples, but {info_path} "
                                  f"records {sizes[s]}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= entry.num_classes):
            raise DataError(path, f"{s} split: labels in [{int(y.min())}, {int(y.max())}], "
                                  f"outside [0, {entry.num_classes})")
        if not bool(torch.isfinite(x).all()):
            raise DataError(path, f"{s} split: inputs hold NaN or infinite values")


# The paper's datasets register themselves; imported last, as they build on this module.
import pipeline.image_datasets  # noqa: E402, F401
