"""A prepared dataset folder, the format every stage after ``download`` reads.

``download`` writes ``dataset.npz`` (uint8 ``images``, int64 ``labels`` and the
``{train,val,test}_idx`` index arrays) and ``split.json`` (dataset name, class count,
input shape, normalisation, split sizes). This module reads them back, checked: a file
that cannot be read, or arrays that disagree with ``split.json``, raise
:class:`~pipeline.errors.DataError` naming the file and the fix. The datasets themselves
(where the images come from) are in :mod:`pipeline.data` and :mod:`pipeline.image_datasets`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline import io
from pipeline.errors import READ_ERRORS, DataError

if TYPE_CHECKING:
    import torch

SPLITS = ("train", "val", "test")


def read_json(path: Path) -> Any:
    """A JSON file, or :class:`DataError` naming it."""
    try:
        return io.read_json(path)
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
    # "segmentation": ``y`` holds (N, H, W) class maps, ``void_label`` marking pixels that
    # no loss or metric counts (CamVid's unlabelled class).
    task: str = "classification"
    void_label: int | None = None

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
    task: str = "classification"  # or "segmentation": one class per pixel
    void_label: int | None = None  # segmentation: the label ignored by losses and metrics


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


def check_indices(idx: np.ndarray, n: int, path: Path, name: str) -> np.ndarray:
    """Integer indices into ``n`` samples, or :class:`DataError` naming ``path``."""
    if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer):
        raise DataError(path, f"{name} must be a 1-d integer array, got {idx.dtype} "
                              f"of shape {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise DataError(path, f"{name} holds indices in [{idx.min()}, {idx.max()}], out of "
                              f"range for {n} samples")
    return idx


def field(info: Any, path: Path, key: str) -> Any:
    if not isinstance(info, dict) or key not in info:
        raise DataError(path, f"no {key!r} field")
    return info[key]


def _normalisation(info: dict[str, Any], info_path: Path,
                   channels: int) -> tuple[float, list[float], list[float]]:
    norm = field(info, info_path, "normalisation")
    try:
        scale = float(norm["scale"])
        # a list per channel, or one number for every pixel (digits, as MNIST's constants)
        mean, std = ([float(v) for v in (norm[k] if isinstance(norm[k], list) else [norm[k]])]
                     for k in ("mean", "std"))
    except (KeyError, TypeError, ValueError) as error:
        raise DataError(info_path, f"bad normalisation {norm!r} "
                                   f"({type(error).__name__}: {error})") from None
    values = [scale, *mean, *std]
    if (len(mean) != channels or len(std) != channels or not all(map(math.isfinite, values))
            or min(scale, *std) <= 0):
        raise DataError(info_path, f"bad normalisation {norm!r}: expected a positive scale and "
                                   f"{channels} finite means and positive stds")
    return scale, mean, std


def load_images(folder: Path, name: str, input_shape: tuple[int, ...],
                stored_shape: tuple[int, ...] | None = None) -> Dataset:
    """Load a prepared folder of uint8 images as normalised float32 tensors of shape
    ``(N, *input_shape)``. ``stored_shape`` is the shape of one stored image when it
    differs (digits store ``(8, 8)`` for input ``(1, 8, 8)``: a channel axis is added).
    Per-channel or scalar normalisation, ``(x / scale - mean) / std``."""
    import torch  # on use: validating params reads the datasets' registry without torch

    info_path, path = folder / "split.json", folder / "dataset.npz"
    info = read_json(info_path)
    arrays = read_npz(path, ["images", "labels", *(f"{s}_idx" for s in SPLITS)])
    images, labels = arrays["images"], arrays["labels"]
    stored = input_shape if stored_shape is None else stored_shape
    # Any real dtype loads (download writes uint8); NaN in float images is caught by the
    # checks of load_dataset, which name the split.
    real = np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)
    if not real or images.shape[1:] != stored or labels.shape != (len(images),):
        raise DataError(path, f"images {images.dtype} of shape {images.shape} and labels of "
                              f"shape {labels.shape}; expected "
                              f"(N, {', '.join(map(str, stored))}) uint8 images and (N,) "
                              "labels")
    if stored != input_shape:
        images = images.reshape(len(images), *input_shape)
    indices = checked_split_indices(arrays, len(images), path)
    scale, mean, std = _normalisation(info, info_path, input_shape[0])
    # Each split normalised from its own uint8 subset: one float copy of the data in all.
    splits = {s: Split(x=torch.from_numpy(normalise(images[idx], scale, mean, std)),
                       y=torch.from_numpy(labels[idx]))
              for s, idx in indices.items()}
    black = normalise(np.zeros((1, input_shape[0], 1, 1), np.uint8), scale, mean, std)
    return Dataset(name, field(info, info_path, "num_classes"),
                   tuple(field(info, info_path, "input_shape")), splits,
                   tuple(float(v) for v in black.reshape(-1)))


