"""Small stand-ins for the paper's datasets, written in their real on-disk formats, and a
local HTTP server to download them from: what the tests give ``data.mirror`` and
``data.checksums`` so that the real download, checksum and parsing code runs offline.

    md5s = write_dataset("cifar10", folder)           # {file name: md5}
    with serve_folder(folder) as url:
        params["data"].update(mirror=url, checksums=md5s)

The content is deterministic for a ``seed``: labels are stratified (every class appears
``n // num_classes`` times or once more, in each of train and test), and each image is its
class's random template blended with noise, so a small model learns something but not
everything. :func:`fake_arrays` returns exactly what :func:`write_dataset` writes, in the
layout the pipeline loads: uint8 ``(N, C, H, W)`` images and int64 labels, SVHN's zeros as 0.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import pickle
import struct
import sys
import tarfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np

# dataset -> (num_classes, image shape (C, H, W), default n_train, default n_test)
SHAPES: dict[str, tuple[int, tuple[int, int, int], int, int]] = {
    "mnist": (10, (1, 28, 28), 60, 20),
    "svhn": (10, (3, 32, 32), 60, 20),
    "cifar10": (10, (3, 32, 32), 50, 20),
    "cifar100": (100, (3, 32, 32), 300, 100),
}
NAMES = tuple(SHAPES)


@dataclass(frozen=True)
class FakeData:
    """What a fake dataset holds, as the pipeline sees it after loading."""

    train_images: np.ndarray  # uint8 (n_train, C, H, W)
    train_labels: np.ndarray  # int64 (n_train,)
    test_images: np.ndarray
    test_labels: np.ndarray

    @property
    def n_train(self) -> int:
        return len(self.train_labels)

    @property
    def n_test(self) -> int:
        return len(self.test_labels)


def md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def fake_arrays(name: str, n_train: int | None = None, n_test: int | None = None,
                seed: int = 0) -> FakeData:
    """The images and labels :func:`write_dataset` writes for these arguments."""
    num_classes, shape, default_train, default_test = SHAPES[name]
    n_train = default_train if n_train is None else n_train
    n_test = default_test if n_test is None else n_test
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, 256, size=(num_classes, *shape))
    arrays = []
    for n in (n_train, n_test):
        labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
        noise = rng.integers(0, 256, size=(n, *shape))
        images = (0.6 * templates[labels] + 0.4 * noise).astype(np.uint8)
        arrays += [images, labels]
    return FakeData(*arrays)


def write_dataset(name: str, folder: Path, n_train: int | None = None,
                  n_test: int | None = None, seed: int = 0) -> dict[str, str]:
    """Write dataset ``name`` (mnist, svhn, cifar10, cifar100) into ``folder`` under the
    official file names and formats; return ``{file name: md5}`` (for data.checksums).
    Defaults: 60/20 images for MNIST and SVHN, 50/20 for CIFAR-10, 300/100 for CIFAR-100."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = fake_arrays(name, n_train, n_test, seed)
    writers = {"mnist": _write_mnist, "svhn": _write_svhn, "cifar10": _write_cifar10,
               "cifar100": _write_cifar100}
    files = writers[name](folder, data)
    return {path.name: md5(path) for path in files}


# --- MNIST: gzipped IDX files --------------------------------------------------------------


def _write_gz(path: Path, payload: bytes) -> Path:
    with open(path, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw,
                                                mtime=0) as gz:
        gz.write(payload)
    return path


def _write_mnist(folder: Path, data: FakeData) -> list[Path]:
    files = []
    for prefix, images, labels in (("train", data.train_images, data.train_labels),
                                   ("t10k", data.test_images, data.test_labels)):
        n, _, rows, cols = images.shape
        files.append(_write_gz(folder / f"{prefix}-images-idx3-ubyte.gz",
                               struct.pack(">IIII", 2051, n, rows, cols) + images.tobytes()))
        files.append(_write_gz(folder / f"{prefix}-labels-idx1-ubyte.gz",
                               struct.pack(">II", 2049, n) + labels.astype(np.uint8).tobytes()))
    return files


# --- CIFAR: python pickles in a tar.gz -----------------------------------------------------


def _write_tar_gz(path: Path, top: str, members: dict[str, Any]) -> Path:
    """``path``: a tar.gz of folder ``top`` holding each member pickled (protocol 2 and
    bytes keys, as the Python 2 originals), or written as is when it is bytes."""
    with open(path, "wb") as raw, \
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.GNU_FORMAT) as tar:
        folder = tarfile.TarInfo(top)
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for name, content in members.items():
            payload = content if isinstance(content, bytes) else pickle.dumps(content, 2)
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode = len(payload), 0o644
            tar.addfile(info, io.BytesIO(payload))
    return path


def _batch(label_key: bytes, images: np.ndarray, labels: np.ndarray, title: str,
           extra: dict[bytes, Any] | None = None) -> dict[bytes, Any]:
    return {
        b"batch_label": title.encode(),
        label_key: [int(v) for v in labels],
        b"data": np.ascontiguousarray(images.reshape(len(images), -1)),
        b"filenames": [f"fake_{i:05d}.png".encode() for i in range(len(images))],
        **(extra or {}),
    }


def _write_cifar10(folder: Path, data: FakeData) -> list[Path]:
    members: dict[str, Any] = {}
    for i, part in enumerate(np.array_split(np.arange(data.n_train), 5), start=1):
        members[f"data_batch_{i}"] = _batch(b"labels", data.train_images[part],
                                            data.train_labels[part],
                                            f"training batch {i} of 5")
    members["test_batch"] = _batch(b"labels", data.test_images, data.test_labels,
                                   "testing batch 1 of 1")
    members["batches.meta"] = {b"num_cases_per_batch": -(-data.n_train // 5),
                               b"label_names": [f"class{i}".encode() for i in range(10)],
                               b"num_vis": 3072}
    members["readme.html"] = b"<html>fake CIFAR-10 for tests</html>\n"
    return [_write_tar_gz(folder / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)]


def _write_cifar100(folder: Path, data: FakeData) -> list[Path]:
    def coarse(labels: np.ndarray) -> dict[bytes, Any]:
        return {b"coarse_labels": [int(v) // 5 for v in labels]}

    members = {
        "train": _batch(b"fine_labels", data.train_images, data.train_labels,
                        "training batch 1 of 1", coarse(data.train_labels)),
        "test": _batch(b"fine_labels", data.test_images, data.test_labels,
                       "testing batch 1 of 1", coarse(data.test_labels)),
        "meta": {b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                 b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]},
    }
    return [_write_tar_gz(folder / "cifar-100-python.tar.gz", "cifar-100-python", members)]


# --- SVHN: MATLAB .mat files ---------------------------------------------------------------


def _write_svhn(folder: Path, data: FakeData) -> list[Path]:
    from scipy.io import savemat

    files = []
    for split, images, labels in (("train", data.train_images, data.train_labels),
                                  ("test", data.test_images, data.test_labels)):
        path = folder / f"{split}_32x32.mat"
        y = np.where(labels == 0, 10, labels).astype(np.uint8).reshape(-1, 1)  # 0 is 10
        # (N, C, H, W) -> (H, W, C, N), SVHN's layout
        savemat(path, {"X": np.transpose(images, (2, 3, 1, 0)), "y": y}, do_compression=True)
        # The header's creation date would change the MD5 each run: fix its text.
        raw = bytearray(path.read_bytes())
        raw[:116] = b"MATLAB 5.0 MAT-file, fake SVHN for tests".ljust(116)
        path.write_bytes(bytes(raw))
        files.append(path)
    return files


# --- serving -------------------------------------------------------------------------------


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up early is no error: torchvision's redirect probe opens a GET
        # and closes it unread.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """Serve ``folder`` over HTTP on 127.0.0.1 (a free port) while the block runs; yield
    the base URL, e.g. ``http://127.0.0.1:41234`` (a ``data.mirror`` value). Requests to
    it bypass any proxy only if ``no_proxy`` covers 127.0.0.1: see :func:`no_proxy_env`."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = _QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, name="serve_folder", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def no_proxy_env() -> dict[str, str]:
    """Environment variables that keep urllib from sending 127.0.0.1 to a proxy."""
    return {"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}
