"""Datasets behind one registry, :data:`DATASETS`: every dataset is registered here.

A dataset entry knows how to *prepare* itself into a folder (download, checksum, split)
and how to *load* that folder back as normalised tensors (:mod:`pipeline.prepared`, the
format). Every later stage reads the prepared folder only, so the network is touched
once, in the ``download`` stage.

The embedded default ``digits`` is scikit-learn's copy of the UCI handwritten digits
(8x8 images, 1,797 samples, 10 classes): it needs no network. The paper's datasets (MNIST,
SVHN, CIFAR-10, CIFAR-100) come from :mod:`pipeline.image_datasets`.

Loading checks what it reads: a file that cannot be read, or a dataset whose shapes, dtypes,
labels, indices or split sizes disagree with ``split.json``, raises :class:`DataError`
naming the file and the fix, never a bare numpy or zipfile traceback.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import camvid
from pipeline.errors import READ_ERRORS, DataError, UnknownDatasetError
from pipeline.image_datasets import SPECS, image_entry
from pipeline.io import atomic_write_json, atomic_write_npz

# Re-exported: these lived here before pipeline.errors and pipeline.prepared.
from pipeline.prepared import (  # noqa: F401
    SPLITS,
    Dataset,
    DatasetEntry,
    Split,
    check_indices,
    checked_split_indices,
    field,
    load_images,
    normalise,
    read_json,
    read_npz,
    resolve_split_seed,
    split_indices,
)
from pipeline.registry import Registry

DATASETS: Registry[DatasetEntry] = Registry("dataset")


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


# Every dataset, registered in one place.
DATASETS.register("digits")(DatasetEntry(
    prepare=_prepare_digits, load=partial(load_images, name="digits", input_shape=(1, 8, 8),
                                          stored_shape=(8, 8)),
    num_classes=10, input_shape=(1, 8, 8)))
for _spec in SPECS:
    DATASETS.register(_spec.name)(image_entry(_spec))
DATASETS.register(camvid.NAME)(camvid.ENTRY)

TASKS = ("classification", "segmentation")


def load_dataset(folder: Path) -> Dataset:
    """Load a folder written by the ``download`` stage, whatever the dataset, and check
    it (:func:`check_dataset`). Any problem raises :class:`DataError`."""
    folder = Path(folder)
    info_path = folder / "split.json"
    info = read_json(info_path)
    name = field(info, info_path, "dataset")
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
    import torch  # on use: validating params reads DATASETS without torch

    info_path, path = folder / "split.json", folder / entry.data_file
    if entry.task == "segmentation":
        check_segmentation(dataset, entry, info, folder)
        return
    if list(field(info, info_path, "input_shape")) != list(entry.input_shape):
        raise DataError(info_path, f"input_shape {info['input_shape']}, but dataset "
                                   f"{dataset.name!r} has {list(entry.input_shape)}")
    if field(info, info_path, "num_classes") != entry.num_classes:
        raise DataError(info_path, f"num_classes {info['num_classes']}, but dataset "
                                   f"{dataset.name!r} has {entry.num_classes}")
    sizes = field(info, info_path, "sizes")
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


def check_segmentation(dataset: Dataset, entry: DatasetEntry, info: dict[str, Any],
                       folder: Path) -> None:
    """:func:`check_dataset` for one class per pixel: float32 finite inputs (N, C, H, W)
    of the shape ``split.json`` records (it depends on ``data.image_scale``), int64 label
    maps (N, H, W) in ``[0, num_classes)`` or the void label, split sizes as recorded."""
    import torch  # on use: validating params reads DATASETS without torch

    info_path, path = folder / "split.json", folder / entry.data_file
    shape = tuple(field(info, info_path, "input_shape"))
    if len(shape) != 3 or shape[0] != entry.input_shape[0]:
        raise DataError(info_path, f"input_shape {list(shape)}, expected [{entry.input_shape[0]}"
                                   ", height, width]")
    sizes = field(info, info_path, "sizes")
    if not isinstance(sizes, dict) or sorted(sizes) != sorted(SPLITS):
        raise DataError(info_path, f"sizes must give {', '.join(SPLITS)}; got {sizes!r}")
    void = entry.void_label
    for s in SPLITS:
        x, y = dataset[s].x, dataset[s].y
        if x.dtype != torch.float32 or y.dtype != torch.int64:
            raise DataError(path, f"{s} split: inputs {x.dtype} and labels {y.dtype}; "
                                  "expected torch.float32 and torch.int64")
        if tuple(x.shape) != (len(y), *shape) or tuple(y.shape) != (len(y), *shape[1:]):
            raise DataError(path, f"{s} split: inputs {tuple(x.shape)} and labels "
                                  f"{tuple(y.shape)}; expected (N, {', '.join(map(str, shape))})"
                                  f" and (N, {shape[1]}, {shape[2]})")
        if len(y) != sizes[s]:
            raise DataError(path, f"{s} split has {len(y)} samples, but {info_path} "
                                  f"records {sizes[s]}")
        bad = (y < 0) | ((y >= entry.num_classes) & (y != void))
        if bool(bad.any()):
            raise DataError(path, f"{s} split: labels outside [0, {entry.num_classes}) and "
                                  f"the void label {void}")
        if not bool(torch.isfinite(x).all()):
            raise DataError(path, f"{s} split: inputs hold NaN or infinite values")
