"""The paper's image datasets: MNIST, SVHN, CIFAR-10 and CIFAR-100 (Corbière et al., 2019).

Each is prepared into the same folder scheme as ``digits`` (``dataset.npz`` and
``split.json``, see :mod:`pipeline.prepared`), following the authors' implementation:

- images: the official training images followed by the official test images, uint8
  ``(N, C, H, W)``; SVHN uses its ``train`` and ``test`` files only, never ``extra``;
- test split: the official test set, in file order;
- validation split: ``data.val_fraction`` (authors: ``valid_size: 0.1``) of the official
  training set, the first ``floor(val_fraction * n_train)`` indices of
  ``np.random.RandomState(split_seed).permutation(n_train)`` (authors: ``np.random.seed(42)``
  then a shuffle of the training indices, which draws the same permutation); the rest is
  the training split. ``data.split_seed`` null means the top-level ``seed``;
- normalisation (authors' constants, ``(x / 255 - mean) / std`` per channel): MNIST mean
  0.1307 std 0.3081; SVHN mean (0.5, 0.5, 0.5) std (0.5, 0.5, 0.5); CIFAR-10 and CIFAR-100
  mean (0.4914, 0.4822, 0.4465) std (0.2023, 0.1994, 0.2010).

Downloads use torchvision's utilities and its own URLs, file names and MD5s (``MNIST.mirrors``
and ``MNIST.resources``, ``CIFAR10/CIFAR100.url/filename/tgz_md5``, ``SVHN.split_list``).
Archives are cached in ``<project root>/.downloads/<dataset>/`` (the project root is
``$DVC_ROOT``, else the working directory), so reruns and queued experiments download once;
a cached file is reused only while its MD5 matches. A file whose MD5 does not match is
deleted and raises :class:`~pipeline.errors.DataError` naming the file, both MD5s and where it
came from; a network failure raises one naming every URL tried. Either way nothing is
written into the prepared folder, and the ``download`` stage exits with status 2.

On a cluster without internet access, fetch the archives once on a machine that has it
(``python -m pipeline.image_datasets`` lists each dataset's files, official URLs and MD5s),
put them, under their official file names, in a shared folder or on an internal web
server, and point ``data.mirror`` at it::

    dvc exp run -S setting=cifar10_vgg16 -S data.mirror=/shared/datasets/confidnet
    dvc exp run -S setting=svhn_smallconv -S data.mirror=https://mirror.internal/datasets

``data.mirror`` is a URL prefix (``http://``, ``https://``, ``file://``) under which the
archives sit as ``<mirror>/<file name>``, or a local folder holding them; relative folders
are taken from the project root. Every file is still checked against torchvision's MD5; an
archive deliberately re-packed on the mirror needs its own MD5 in ``data.checksums``
(``{file name: md5}``).

Parsing is done here, small and exact: gzipped IDX files (MNIST), the python pickles inside
the CIFAR ``tar.gz`` (read with an unpickler that only builds plain containers and numpy
arrays), and SVHN's MATLAB ``.mat`` files (``scipy.io.loadmat``; label 10 means digit 0,
mapped to 0 as torchvision does). Content that does not parse raises ``DataError`` naming
the file.
"""

from __future__ import annotations

import contextlib
import gzip
import math
import pickle
import shutil
import socket
import struct
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np

from pipeline.errors import DataError
from pipeline.io import atomic_write_json, atomic_write_npz, atomic_write_text
from pipeline.prepared import SPLITS, Dataset, DatasetEntry, load_images, resolve_split_seed

DOWNLOADS = ".downloads"  # under the project root, one folder per dataset
SCALE = 255.0
# Per-URL socket timeout: a mirror that stops answering fails instead of hanging the stage.
TIMEOUT_SECONDS = 60.0
# What a failed download raises: urllib's URLError/HTTPError, socket errors and timeouts
# (OSError), a connection dropped mid-body (HTTPException), a malformed URL (ValueError).
NETWORK_ERRORS = (urllib.error.URLError, OSError, HTTPException, ValueError)

MIRROR_HELP = (
    "Without internet access (a cluster node), set data.mirror to an internal mirror (a URL "
    "prefix under which the archives sit by their official file names) or to a folder of "
    "pre-downloaded archives, e.g. `dvc exp run -S data.mirror=/shared/datasets`; "
    "`python -m pipeline.image_datasets` lists the files."
)


@dataclass(frozen=True)
class Archive:
    """One file to download: its official name, MD5 and URLs (tried in turn)."""

    filename: str  # may hold folders ("train/0001TP_006690.png"), kept under the cache
    md5: str
    urls: tuple[str, ...]
    md5_origin: str = "torchvision's official MD5"  # named when the MD5 does not match


@dataclass(frozen=True)
class Parsed:
    """The official training and test sets, as read from the archives."""

    train_images: np.ndarray  # uint8 (n, C, H, W)
    train_labels: np.ndarray  # int64 (n,)
    test_images: np.ndarray
    test_labels: np.ndarray


@dataclass(frozen=True)
class ImageSpec:
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    archives: Callable[[], list[Archive]]  # from torchvision's class attributes
    parse: Callable[[dict[str, Path]], Parsed]  # file name -> cached path


# --- official sources, from torchvision ----------------------------------------------------


def _mnist_archives() -> list[Archive]:
    from torchvision.datasets import MNIST

    return [Archive(name, md5, tuple(f"{mirror}{name}" for mirror in MNIST.mirrors))
            for name, md5 in MNIST.resources]


def _cifar_archives(cls_name: str) -> Callable[[], list[Archive]]:
    def archives() -> list[Archive]:
        import torchvision.datasets

        cls = getattr(torchvision.datasets, cls_name)
        return [Archive(cls.filename, cls.tgz_md5, (cls.url,))]

    return archives


def _svhn_archives() -> list[Archive]:
    from torchvision.datasets import SVHN

    archives = []
    for split in ("train", "test"):  # never "extra" (authors: train split only)
        url, filename, md5 = SVHN.split_list[split]
        archives.append(Archive(filename, md5, (url,)))
    return archives


# --- download ------------------------------------------------------------------------------


def cache_dir(name: str) -> Path:
    """Where the archives of dataset ``name`` are cached: ``<project root>/.downloads/name``."""
    from pipeline.runtime import project_root

    return project_root() / DOWNLOADS / name


def _mirror_locations(mirror: str, filename: str) -> tuple[str | Path, ...]:
    """Where to fetch ``filename`` from, given a non-empty ``data.mirror``."""
    scheme = urllib.parse.urlsplit(mirror).scheme.lower()
    if scheme in ("http", "https", "ftp"):
        return (f"{mirror.rstrip('/')}/{urllib.parse.quote(filename)}",)
    if scheme == "file":
        folder = Path(urllib.request.url2pathname(urllib.parse.urlsplit(mirror).path))
    else:
        from pipeline.runtime import project_root

        folder = project_root() / Path(mirror).expanduser()
    if not folder.is_dir():
        raise DataError(folder, f"data.mirror = {mirror!r} is neither a URL (http://, https://, "
                                "file://) nor an existing folder", MIRROR_HELP)
    return (folder / filename,)


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def fetch(archive: Archive, cache: Path, mirror: str,
          checksums: dict[str, str]) -> dict[str, str]:
    """Make sure ``cache/<archive.filename>`` holds the file with the expected MD5
    (``data.checksums`` entry, else torchvision's): reuse a good cached copy, else download
    it (official URLs in turn, or ``data.mirror``) into a temporary name, check it and move
    it in place. Returns ``{"file", "md5", "source"}`` for ``split.json``."""
    from torchvision.datasets.utils import calculate_md5, check_integrity, download_url

    name = archive.filename
    expected = checksums.get(name, archive.md5)
    origin = "data.checksums" if name in checksums else archive.md5_origin
    target, record = cache / name, cache / f"{name}.source"
    if check_integrity(target, expected):
        source = record.read_text().strip() if record.is_file() else str(target)
        return {"file": name, "md5": expected, "source": source}
    target.unlink(missing_ok=True)  # a stale or damaged copy: download again
    target.parent.mkdir(parents=True, exist_ok=True)
    locations = _mirror_locations(mirror, name) if mirror else archive.urls
    failures = []
    for location in locations:
        part = target.parent / f".{target.name}.{uuid.uuid4().hex}.part"
        try:
            if isinstance(location, Path):
                if not location.is_file():
                    failures.append(f"{location} (no such file)")
                    continue
                shutil.copyfile(location, part)
            else:
                with _socket_timeout(TIMEOUT_SECONDS), contextlib.suppress(RuntimeError):
                    # RuntimeError: torchvision's "File not found or corrupted." (MD5 below)
                    download_url(location, str(part.parent), part.name, expected)
                if not part.is_file():
                    failures.append(f"{location} (nothing downloaded)")
                    continue
            actual = calculate_md5(part)
            if actual != expected:
                where = f"data.mirror = {mirror!r}" if mirror else "the official URL"
                raise DataError(
                    target,
                    f"MD5 mismatch: got {actual}, expected {expected} ({origin}); downloaded "
                    f"from {location} ({where}). The file is truncated or not the right one; "
                    f"it was deleted from the cache.",
                    f"Replace the file at its source, or, if it is an archive deliberately "
                    f"re-packed, set data.checksums.{name} to its MD5; then rerun "
                    f"`dvc repro download`.",
                )
            part.replace(target)
            atomic_write_text(record, f"{location}\n")
            return {"file": name, "md5": expected, "source": str(location)}
        except NETWORK_ERRORS as error:
            failures.append(f"{location} ({type(error).__name__}: {error})")
        finally:
            part.unlink(missing_ok=True)
    problem = f"could not download {name}; tried: " + "; ".join(failures)
    fix = MIRROR_HELP
    if mirror:
        fix = (f"Check data.mirror = {mirror!r}: it must hold {name} under its official name. "
               + MIRROR_HELP)
    raise DataError(target, problem, fix)


# --- parsing -------------------------------------------------------------------------------


def _malformed(path: Path, problem: str) -> DataError:
    return DataError(path, f"malformed archive: {problem}",
                     f"Its MD5 matched, so the mirror (data.mirror) or data.checksums point at a "
                     f"bad copy: replace it with the official file and delete {path}.")


def read_idx(path: Path, magic: int) -> np.ndarray:
    """A gzipped IDX file of unsigned bytes (MNIST): big-endian int32 magic (2051 images,
    three dimensions; 2049 labels, one), the dimensions, then the data."""
    dims = magic & 0xFF
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise _malformed(path, f"not a readable gzip file ({type(error).__name__}: "
                               f"{error})") from None
    header = 4 * (1 + dims)
    found = struct.unpack(">I", raw[:4])[0] if len(raw) >= 4 else None
    if found != magic:
        raise _malformed(path, f"IDX magic number {found}, expected {magic}")
    if len(raw) < header:
        raise _malformed(path, f"{len(raw)} bytes, shorter than its IDX header")
    shape = struct.unpack(f">{dims}I", raw[4:header])
    if len(raw) - header != math.prod(shape):
        raise _malformed(path, f"{len(raw) - header} bytes of data for shape {tuple(shape)}, "
                               f"expected {math.prod(shape)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _by_prefix(paths: dict[str, Path], prefix: str) -> Path:
    [name] = [name for name in paths if name.startswith(prefix)]
    return paths[name]


def _parse_mnist(paths: dict[str, Path]) -> Parsed:
    arrays = []
    for split in ("train", "t10k"):
        images_path = _by_prefix(paths, f"{split}-images")
        labels_path = _by_prefix(paths, f"{split}-labels")
        images, labels = read_idx(images_path, 2051), read_idx(labels_path, 2049)
        if len(images) != len(labels):
            raise _malformed(labels_path, f"{len(labels)} labels for the {len(images)} images "
                                          f"of {images_path.name}")
        arrays += [images[:, None], _labels(labels, 0, 9, labels_path)]
    return Parsed(*arrays)


def _labels(values: Any, low: int, high: int, path: Path) -> np.ndarray:
    labels = np.asarray(values).reshape(-1)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise _malformed(path, f"labels of type {labels.dtype}, expected integers")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < low or labels.max() > high):
        raise _malformed(path, f"labels in [{labels.min()}, {labels.max()}], expected "
                               f"[{low}, {high}]")
    return labels


class _SafeUnpickler(pickle.Unpickler):
    """Builds what the CIFAR pickles hold (dicts, lists, strings, numpy arrays) and refuses
    any other global, so an archive from a mirror cannot run code."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(handle: IO[bytes]) -> dict[str, Any]:
    # latin1: the official pickles were written by Python 2 (as torchvision reads them)
    entry = _SafeUnpickler(handle, encoding="latin1").load()
    if not isinstance(entry, dict):
        raise pickle.UnpicklingError(f"a {type(entry).__name__}, not a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}


def _cifar_parser(cls_name: str, label_key: str, num_classes: int
                  ) -> Callable[[dict[str, Path]], Parsed]:
    def parse(paths: dict[str, Path]) -> Parsed:
        import torchvision.datasets

        cls = getattr(torchvision.datasets, cls_name)
        [path] = paths.values()
        members = {split: [f"{cls.base_folder}/{name}" for name, _ in files]
                   for split, files in (("train", cls.train_list), ("test", cls.test_list))}
        wanted = {m for names in members.values() for m in names}
        entries: dict[str, dict[str, Any]] = {}
        try:
            with tarfile.open(path, "r:gz") as tar:
                for info in tar:  # one pass: no seeking back in the gzip stream
                    if info.name in wanted and info.isfile():
                        handle = tar.extractfile(info)
                        assert handle is not None
                        entries[info.name] = _unpickle(handle)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
            raise _malformed(path, f"not a readable tar.gz ({type(error).__name__}: "
                                   f"{error})") from None
        except Exception as error:  # noqa: BLE001  whatever a damaged pickle raises
            raise _malformed(path, f"a batch does not unpickle ({type(error).__name__}: "
                                   f"{error})") from None
        missing = sorted(wanted - set(entries))
        if missing:
            raise _malformed(path, f"no member {', '.join(missing)}")
        arrays = []
        for split in ("train", "test"):
            images, labels = [], []
            for member in members[split]:
                entry = entries[member]
                data = entry.get("data")
                if (not isinstance(data, np.ndarray) or data.dtype != np.uint8
                        or data.ndim != 2 or data.shape[1] != 3 * 32 * 32):
                    raise _malformed(path, f"{member}: 'data' must be a uint8 array of shape "
                                           f"(N, 3072), got {getattr(data, 'dtype', data)!r} "
                                           f"of shape {getattr(data, 'shape', None)}")
                if label_key not in entry or len(entry[label_key]) != len(data):
                    raise _malformed(path, f"{member}: no {label_key!r} list of {len(data)} "
                                           "labels")
                images.append(data.reshape(-1, 3, 32, 32))
                labels.append(_labels(entry[label_key], 0, num_classes - 1, path))
            arrays += [np.concatenate(images), np.concatenate(labels)]
        return Parsed(*arrays)

    return parse


def _parse_svhn(paths: dict[str, Path]) -> Parsed:
    from scipy.io import loadmat

    arrays = []
    for split in ("train", "test"):
        path = _by_prefix(paths, f"{split}_")
        try:
            mat = loadmat(path)
        except Exception as error:  # noqa: BLE001  scipy raises many kinds on a damaged file
            raise _malformed(path, f"not a readable MATLAB file ({type(error).__name__}: "
                                   f"{error})") from None
        x, y = mat.get("X"), mat.get("y")
        if (not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4
                or x.shape[:3] != (32, 32, 3)):
            raise _malformed(path, f"'X' must be a uint8 array of shape (32, 32, 3, N), got "
                                   f"{getattr(x, 'dtype', x)!r} of shape "
                                   f"{getattr(x, 'shape', None)}")
        if not isinstance(y, np.ndarray) or y.size != x.shape[3]:
            raise _malformed(path, f"'y' must hold {x.shape[3]} labels, got "
                                   f"{getattr(y, 'shape', y)!r}")
        labels = _labels(y, 0, 10, path)
        labels[labels == 10] = 0  # SVHN writes digit 0 as label 10
        # (H, W, C, N) -> (N, C, H, W), as torchvision's SVHN
        arrays += [np.transpose(x, (3, 2, 0, 1)), labels]
    return Parsed(*arrays)


# --- prepare and load ----------------------------------------------------------------------


def authors_split(n_train: int, n_test: int, val_fraction: float,
                  split_seed: int) -> dict[str, np.ndarray]:
    """Indices into the official training images followed by the test images: validation is
    the first ``floor(val_fraction * n_train)`` of ``RandomState(split_seed).permutation``
    of the training images, train the rest, test the official test set (each sorted)."""
    permutation = np.random.RandomState(split_seed).permutation(n_train).astype(np.int64)
    n_val = int(np.floor(val_fraction * n_train))
    return {"train": np.sort(permutation[n_val:]), "val": np.sort(permutation[:n_val]),
            "test": np.arange(n_train, n_train + n_test, dtype=np.int64)}


def _prepare(spec: ImageSpec, out_dir: Path, data_params: dict[str, Any],
             seed: int) -> dict[str, Any]:
    split_seed = resolve_split_seed(data_params, seed)
    mirror = str(data_params.get("mirror") or "").strip()
    checksums = dict(data_params.get("checksums") or {})
    cache = cache_dir(spec.name)
    archives = spec.archives()
    sources = [fetch(archive, cache, mirror, checksums) for archive in archives]
    parsed = spec.parse({a.filename: cache / a.filename for a in archives})
    for images, labels in ((parsed.train_images, parsed.train_labels),
                           (parsed.test_images, parsed.test_labels)):
        # the parsers check their files; this guards the shape the registry promises
        if images.shape[1:] != spec.input_shape or labels.shape != (len(images),):
            raise DataError(cache, f"{spec.name}: parsed images of shape {images.shape} and "
                                   f"labels of shape {labels.shape}; expected "
                                   f"(N, {', '.join(map(str, spec.input_shape))}) and (N,)")
    n_train, n_test = len(parsed.train_labels), len(parsed.test_labels)
    images = np.concatenate([parsed.train_images, parsed.test_images])
    labels = np.concatenate([parsed.train_labels, parsed.test_labels]).astype(np.int64)
    del parsed
    idx = authors_split(n_train, n_test, data_params["val_fraction"], split_seed)
    atomic_write_npz(out_dir / "dataset.npz", images=images, labels=labels,
                     **{f"{s}_idx": idx[s] for s in SPLITS})
    info = {
        "dataset": spec.name,
        "seed": seed,
        "split_seed": split_seed,
        "num_classes": spec.num_classes,
        "input_shape": list(spec.input_shape),
        "normalisation": {"scale": SCALE, "mean": list(spec.mean), "std": list(spec.std)},
        "sizes": {s: len(idx[s]) for s in SPLITS},
        "val_fraction": data_params["val_fraction"],
        "sources": sources,
    }
    atomic_write_json(out_dir / "split.json", info)
    return info


CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)

SPECS = (
    ImageSpec("mnist", 10, (1, 28, 28), (0.1307,), (0.3081,), _mnist_archives, _parse_mnist),
    ImageSpec("svhn", 10, (3, 32, 32), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), _svhn_archives,
              _parse_svhn),
    ImageSpec("cifar10", 10, (3, 32, 32), CIFAR_MEAN, CIFAR_STD, _cifar_archives("CIFAR10"),
              _cifar_parser("CIFAR10", "labels", 10)),
    ImageSpec("cifar100", 100, (3, 32, 32), CIFAR_MEAN, CIFAR_STD, _cifar_archives("CIFAR100"),
              _cifar_parser("CIFAR100", "fine_labels", 100)),
)


def image_entry(spec: ImageSpec) -> DatasetEntry:
    """The registry entry of ``spec`` (registered in :mod:`pipeline.data`)."""
    def prepare(out_dir: Path, data_params: dict[str, Any], seed: int) -> dict[str, Any]:
        return _prepare(spec, Path(out_dir), data_params, seed)

    def load(folder: Path) -> Dataset:
        return load_images(Path(folder), spec.name, spec.input_shape)

    prepare.__doc__ = f"Download (or reuse the cached archives of) {spec.name}, split it."
    load.__doc__ = f"Load a prepared {spec.name} folder as normalised tensors."
    return DatasetEntry(prepare=prepare, load=load, num_classes=spec.num_classes,
                        input_shape=spec.input_shape)


def archive_table(names: Sequence[str] | None = None) -> str:
    """Each dataset's archives (every dataset's by default): official file name, MD5 and
    URLs (for a mirror)."""
    if names is None:
        names = [spec.name for spec in SPECS]
    by_name = {spec.name: spec for spec in SPECS}
    lines = []
    for name in names:
        for archive in by_name[name].archives():
            lines.append(f"{name}\t{archive.filename}\t{archive.md5}\t{' '.join(archive.urls)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print("dataset\tfile\tmd5\turls")
    print(archive_table())
