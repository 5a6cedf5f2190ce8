"""The paper's datasets (``pipeline.image_datasets``), offline: small files in the real
formats (``fake_datasets``) served over a local HTTP server or a folder given as
``data.mirror``, through the real download, checksum, parsing, split and load code, and the
``download`` stage run as a subprocess."""

from __future__ import annotations

import json
import math
import shutil
import time
import urllib.error
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import fast_params, free_port, make_project, run
from fake_datasets import NAMES, fake_arrays, no_proxy_env, serve_folder, write_dataset

from pipeline.data import DATASETS, SPLITS, DataError, load_dataset
from pipeline.image_datasets import SPECS, authors_split
from pipeline.io import load_npz

SPEC = {spec.name: spec for spec in SPECS}
FILES = {
    "mnist": ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"],
    "svhn": ["train_32x32.mat", "test_32x32.mat"],
    "cifar10": ["cifar-10-python.tar.gz"],
    "cifar100": ["cifar-100-python.tar.gz"],
}


@pytest.fixture(scope="module")
def mirror(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A folder with all four fake datasets (their file names do not collide) and the
    MD5 of each file."""
    folder = tmp_path_factory.mktemp("mirror")
    md5s: dict[str, str] = {}
    for name in NAMES:
        md5s.update(write_dataset(name, folder))
    return folder, md5s


@pytest.fixture(scope="module")
def server(mirror: tuple[Path, dict[str, str]]) -> Any:
    with serve_folder(mirror[0]) as url:
        yield url


@pytest.fixture(autouse=True)
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The project root of each test (so its own empty download cache), no proxy."""
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "root"))
    for key, value in no_proxy_env().items():
        monkeypatch.setenv(key, value)
    return tmp_path / "root"


def data_params(mirror: str, checksums: dict[str, str], split_seed: int | None = 42,
                **extra: Any) -> dict[str, Any]:
    return {"test_fraction": 0.3, "val_fraction": 0.1, "split_seed": split_seed,
            "mirror": mirror, "checksums": checksums, **extra}


def cache_files(root: Path, name: str) -> list[str]:
    folder = root / ".downloads" / name
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --- each dataset, end to end -------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_prepare_and_load(name: str, server: str, mirror: tuple[Path, dict[str, str]],
                          tmp_path: Path, root: Path) -> None:
    _, md5s = mirror
    out = tmp_path / "data"
    info = DATASETS[name].prepare(out, data_params(server, md5s), 0)
    fake = fake_arrays(name)
    spec = SPEC[name]
    n_train, n_test = fake.n_train, fake.n_test
    n_val = math.floor(0.1 * n_train)

    assert sorted(p.name for p in out.iterdir()) == ["dataset.npz", "split.json"]
    assert json.loads((out / "split.json").read_text()) == info
    assert info == {
        "dataset": name, "seed": 0, "split_seed": 42, "num_classes": spec.num_classes,
        "input_shape": list(spec.input_shape),
        "normalisation": {"scale": 255.0, "mean": list(spec.mean), "std": list(spec.std)},
        "sizes": {"train": n_train - n_val, "val": n_val, "test": n_test},
        "val_fraction": 0.1,
        "sources": [{"file": f, "md5": md5s[f], "source": f"{server}/{f}"} for f in FILES[name]],
    }
    # the archives are cached under the project root, nothing half-written left there
    assert cache_files(root, name) == sorted([*FILES[name], *(f"{f}.source" for f in FILES[name])])

    # the authors' split: val = first floor(0.1 n) of RandomState(42).permutation(n_train)
    arrays = load_npz(out / "dataset.npz")
    permutation = np.random.RandomState(42).permutation(n_train)
    np.testing.assert_array_equal(arrays["val_idx"], np.sort(permutation[:n_val]))
    np.testing.assert_array_equal(arrays["train_idx"], np.sort(permutation[n_val:]))
    np.testing.assert_array_equal(arrays["test_idx"], np.arange(n_train, n_train + n_test))
    assert arrays["images"].dtype == np.uint8 and arrays["labels"].dtype == np.int64
    np.testing.assert_array_equal(arrays["images"],
                                  np.concatenate([fake.train_images, fake.test_images]))

    dataset = load_dataset(out)
    assert (dataset.name, dataset.num_classes, dataset.input_shape) == (
        name, spec.num_classes, spec.input_shape)
    mean = np.array(spec.mean).reshape(1, -1, 1, 1)
    std = np.array(spec.std).reshape(1, -1, 1, 1)
    raw = {"train": fake.train_images[arrays["train_idx"]],
           "val": fake.train_images[arrays["val_idx"]], "test": fake.test_images}
    labels = {"train": fake.train_labels[arrays["train_idx"]],
              "val": fake.train_labels[arrays["val_idx"]], "test": fake.test_labels}
    for s in SPLITS:
        x, y = dataset[s].x.numpy(), dataset[s].y.numpy()
        assert x.dtype == np.float32 and x.shape == (info["sizes"][s], *spec.input_shape)
        np.testing.assert_array_equal(y, labels[s])
        np.testing.assert_allclose(x, (raw[s] / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)
    # one pixel by hand: the first test image, last channel, pixel (3, 5)
    c = spec.input_shape[0] - 1
    expected = (fake.test_images[0, c, 3, 5] / 255 - spec.mean[c]) / spec.std[c]
    assert dataset["test"].x[0, c, 3, 5].item() == pytest.approx(expected, abs=1e-5)
    assert dataset.pad_value == pytest.approx([-m / s for m, s in zip(spec.mean, spec.std,
                                                                      strict=True)])
    # every class is in the (small) training split
    assert set(dataset["train"].y.tolist()) == set(range(spec.num_classes))


def test_svhn_label_10_is_digit_0(server: str, mirror: tuple[Path, dict[str, str]],
                                  tmp_path: Path) -> None:
    from scipy.io import loadmat

    folder, md5s = mirror
    written = loadmat(folder / "train_32x32.mat")["y"].ravel()
    assert written.min() == 1 and written.max() == 10  # the file has SVHN's labels
    DATASETS["svhn"].prepare(tmp_path / "data", data_params(server, md5s), 0)
    dataset = load_dataset(tmp_path / "data")
    train_and_val = np.concatenate([dataset["train"].y.numpy(), dataset["val"].y.numpy()])
    assert sorted(np.unique(train_and_val)) == list(range(10))
    assert (np.bincount(train_and_val) == np.bincount(np.where(written == 10, 0, written))).all()


def test_split_seed(server: str, mirror: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    _, md5s = mirror

    def val_idx(folder: str, split_seed: int | None, seed: int) -> np.ndarray:
        DATASETS["mnist"].prepare(tmp_path / folder, data_params(server, md5s, split_seed), seed)
        return load_npz(tmp_path / folder / "dataset.npz")["val_idx"]

    fixed = val_idx("fixed", 42, 0)
    np.testing.assert_array_equal(val_idx("fixed_other_seed", 42, 7), fixed)
    np.testing.assert_array_equal(val_idx("from_seed", None, 42), fixed)  # null: `seed`
    assert json.loads((tmp_path / "from_seed" / "split.json").read_text())["split_seed"] == 42
    assert not np.array_equal(val_idx("other", 43, 0), fixed)
    np.testing.assert_array_equal(authors_split(60, 20, 0.1, 42)["val"], fixed)


def test_digits_split_seed_and_pad_value(tmp_path: Path) -> None:
    digits = DATASETS["digits"]
    params = {"test_fraction": 0.3, "val_fraction": 0.1}
    default = digits.prepare(tmp_path / "default", params, 3)
    explicit = digits.prepare(tmp_path / "explicit", {**params, "split_seed": 3}, 0)
    assert default["split_seed"] == explicit["split_seed"] == 3
    for s in SPLITS:
        np.testing.assert_array_equal(load_npz(tmp_path / "default" / "dataset.npz")[f"{s}_idx"],
                                      load_npz(tmp_path / "explicit" / "dataset.npz")[f"{s}_idx"])
    dataset = load_dataset(tmp_path / "default")
    norm = default["normalisation"]
    assert dataset.pad_value == pytest.approx((-norm["mean"] / norm["std"],))


# --- mirrors and the cache ----------------------------------------------------------------


def test_local_folder_and_file_url_mirrors(mirror: tuple[Path, dict[str, str]], tmp_path: Path,
                                           root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, md5s = mirror
    info = DATASETS["cifar10"].prepare(tmp_path / "a", data_params(str(folder), md5s), 0)
    assert info["sources"] == [{"file": "cifar-10-python.tar.gz",
                                "md5": md5s["cifar-10-python.tar.gz"],
                                "source": str(folder / "cifar-10-python.tar.gz")}]
    assert (folder / "cifar-10-python.tar.gz").exists()  # copied, not moved
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "other_root"))  # an empty cache
    info = DATASETS["mnist"].prepare(tmp_path / "b", data_params(folder.as_uri(), md5s), 0)
    assert info["sources"][0]["source"] == str(folder / "train-images-idx3-ubyte.gz")
    assert len(load_dataset(tmp_path / "b")["test"]) == 20


def test_relative_mirror_folder_is_under_the_project_root(
        mirror: tuple[Path, dict[str, str]], tmp_path: Path, root: Path) -> None:
    folder, md5s = mirror
    shutil.copytree(folder, root / "archives")
    DATASETS["svhn"].prepare(tmp_path / "data", data_params("archives", md5s), 0)
    assert load_dataset(tmp_path / "data").name == "svhn"


def test_cached_archives_are_not_downloaded_again(server: str, tmp_path: Path, root: Path,
                                                  mirror: tuple[Path, dict[str, str]]) -> None:
    _, md5s = mirror
    first = DATASETS["mnist"].prepare(tmp_path / "a", data_params(server, md5s), 0)
    # a mirror that cannot answer: everything comes from the cache
    closed = f"http://127.0.0.1:{free_port()}"
    second = DATASETS["mnist"].prepare(tmp_path / "b", data_params(closed, md5s), 0)
    assert second == first  # sources still name where the archives came from
    assert (tmp_path / "a" / "dataset.npz").read_bytes() == (
        tmp_path / "b" / "dataset.npz").read_bytes()


def test_damaged_cached_file_is_downloaded_again(server: str, tmp_path: Path, root: Path,
                                                 mirror: tuple[Path, dict[str, str]]) -> None:
    folder, md5s = mirror
    cache = root / ".downloads" / "cifar100"
    cache.mkdir(parents=True)
    good = (folder / "cifar-100-python.tar.gz").read_bytes()
    (cache / "cifar-100-python.tar.gz").write_bytes(good[:1000])  # an interrupted copy
    DATASETS["cifar100"].prepare(tmp_path / "data", data_params(server, md5s), 0)
    assert (cache / "cifar-100-python.tar.gz").read_bytes() == good


# --- failures -----------------------------------------------------------------------------


def assert_nothing_left(out: Path, root: Path, name: str, bad_file: str) -> None:
    assert not out.exists()
    left = cache_files(root, name)
    assert bad_file not in left and not [f for f in left if f.endswith(".part")], left


def test_truncated_file_on_the_mirror(mirror: tuple[Path, dict[str, str]], tmp_path: Path,
                                      root: Path) -> None:
    folder, md5s = mirror
    bad = tmp_path / "bad_mirror"
    shutil.copytree(folder, bad)
    path = bad / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:5000])
    truncated_md5 = __import__("hashlib").md5(path.read_bytes()).hexdigest()
    out = tmp_path / "data"
    with serve_folder(bad) as url, pytest.raises(DataError) as caught:
        DATASETS["mnist"].prepare(out, data_params(url, md5s), 0)
    message = str(caught.value)
    assert str(root / ".downloads" / "mnist" / "train-images-idx3-ubyte.gz") in message
    assert f"got {truncated_md5}, expected {md5s['train-images-idx3-ubyte.gz']}" in message
    assert f"from {url}/train-images-idx3-ubyte.gz (data.mirror = {url!r})" in message
    assert "(data.checksums)" in message and "deleted from the cache" in message
    assert_nothing_left(out, root, "mnist", "train-images-idx3-ubyte.gz")
    # a rerun against a good mirror downloads it again and succeeds
    with serve_folder(folder) as url:
        DATASETS["mnist"].prepare(out, data_params(url, md5s), 0)
    assert load_dataset(out).name == "mnist"


def test_checksum_mismatch_from_a_local_folder(mirror: tuple[Path, dict[str, str]],
                                               tmp_path: Path, root: Path) -> None:
    folder, md5s = mirror
    wrong = {**md5s, "test_32x32.mat": "0" * 32}
    out = tmp_path / "data"
    with pytest.raises(DataError) as caught:
        DATASETS["svhn"].prepare(out, data_params(str(folder), wrong), 0)
    message = str(caught.value)
    assert "test_32x32.mat: MD5 mismatch" in message
    assert f"got {md5s['test_32x32.mat']}, expected {'0' * 32} (data.checksums)" in message
    assert str(folder / "test_32x32.mat") in message
    assert "set data.checksums.test_32x32.mat" in message
    assert_nothing_left(out, root, "svhn", "test_32x32.mat")
    assert (folder / "test_32x32.mat").exists()  # the mirror's own file is left alone


def test_official_md5_is_checked_without_data_checksums(server: str, tmp_path: Path,
                                                        root: Path) -> None:
    # the fake archive is not the official one: torchvision's MD5 rejects it
    from torchvision.datasets import CIFAR10

    with pytest.raises(DataError, match=f"expected {CIFAR10.tgz_md5} \\(torchvision's official"):
        DATASETS["cifar10"].prepare(tmp_path / "data", data_params(server, {}), 0)
    assert_nothing_left(tmp_path / "data", root, "cifar10", "cifar-10-python.tar.gz")


def test_unreachable_mirror(mirror: tuple[Path, dict[str, str]], tmp_path: Path,
                            root: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(DataError) as caught:
        DATASETS["mnist"].prepare(tmp_path / "data", data_params(url, mirror[1]), 0)
    assert time.monotonic() - started < 10
    message = str(caught.value)
    assert f"could not download train-images-idx3-ubyte.gz; tried: {url}/train-images" in message
    assert "Connection refused" in message
    assert f"Check data.mirror = {url!r}" in message and "set data.mirror to" in message
    assert_nothing_left(tmp_path / "data", root, "mnist", "train-images-idx3-ubyte.gz")


def test_missing_file_in_mirror_folder(mirror: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"tried: .*cifar-100-python.tar.gz \(no such file\)"):
        DATASETS["cifar100"].prepare(tmp_path / "data", data_params(str(tmp_path), {}), 0)
    with pytest.raises(DataError, match=r"is neither a URL .* nor an existing folder"):
        DATASETS["cifar100"].prepare(tmp_path / "data", data_params("/no/such/folder", {}), 0)
    assert not (tmp_path / "data").exists()


def test_offline_official_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without data.mirror every official URL is tried (torchvision's, MNIST's mirrors in
    turn), and the error says how to use data.mirror."""
    import torchvision.datasets.utils
    from torchvision.datasets import MNIST, SVHN

    tried: list[str] = []

    def offline(url: str, *args: Any, **kwargs: Any) -> None:
        tried.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)
    with pytest.raises(DataError) as caught:
        DATASETS["mnist"].prepare(tmp_path / "data", data_params("", {}), 0)
    name = MNIST.resources[0][0]
    assert tried == [f"{m}{name}" for m in MNIST.mirrors]
    message = str(caught.value)
    assert all(url in message for url in tried)
    assert "Without internet access (a cluster node), set data.mirror" in message
    assert [a.filename for a in SPEC["svhn"].archives()] == [
        SVHN.split_list["train"][1], SVHN.split_list["test"][1]]  # never "extra"


@pytest.mark.parametrize(("name", "file", "content", "problem"), [
    ("mnist", "t10k-labels-idx1-ubyte.gz", b"not gzip", "not a readable gzip file"),
    ("mnist", "train-images-idx3-ubyte.gz", "idx:2049", "IDX magic number 2049, expected 2051"),
    ("cifar10", "cifar-10-python.tar.gz", b"\x1f\x8b garbage", "not a readable tar.gz"),
    ("cifar100", "cifar-100-python.tar.gz", "evil-pickle", "refusing to load posix.system"),
    ("svhn", "train_32x32.mat", b"MATLAB 5.0 but not", "not a readable MATLAB file"),
])
def test_malformed_archive_with_matching_checksum(name: str, file: str, content: Any,
                                                  problem: str, tmp_path: Path,
                                                  mirror: tuple[Path, dict[str, str]]) -> None:
    import gzip
    import hashlib
    import io
    import os
    import pickle
    import struct
    import tarfile

    folder = tmp_path / "mirror"
    shutil.copytree(mirror[0], folder)
    if content == "idx:2049":
        content = gzip.compress(struct.pack(">II", 2049, 1) + b"\x00")
    elif content == "evil-pickle":
        class Evil:
            def __reduce__(self) -> tuple[Any, ...]:
                return (os.system, ("echo pwned",))

        payload = pickle.dumps({b"data": Evil()}, 2)
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            info = tarfile.TarInfo("cifar-100-python/train")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        content = buffer.getvalue()
    (folder / file).write_bytes(content)
    checksums = {**mirror[1], file: hashlib.md5(content).hexdigest()}
    with pytest.raises(DataError) as caught:
        DATASETS[name].prepare(tmp_path / "data", data_params(str(folder), checksums), 0)
    message = str(caught.value)
    assert message.startswith(f"{tmp_path / 'root' / '.downloads' / name / file}: malformed")
    assert problem in message, message
    assert not (tmp_path / "data").exists()


def test_loader_checks_per_channel_normalisation(server: str, tmp_path: Path,
                                                 mirror: tuple[Path, dict[str, str]]) -> None:
    out = tmp_path / "data"
    DATASETS["cifar10"].prepare(out, data_params(server, mirror[1]), 0)
    info = json.loads((out / "split.json").read_text())
    info["normalisation"]["std"] = [0.2, 0.2]
    (out / "split.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="expected a positive scale and 3 finite means"):
        load_dataset(out)


# --- the download stage -------------------------------------------------------------------


def stage_params(mirror: str, checksums: dict[str, str]) -> dict[str, Any]:
    params = fast_params()
    params.update(setting="mnist_mlp", dataset="mnist")
    params["data"].update(mirror=mirror, checksums=checksums, split_seed=42)
    return params


def test_download_stage(server: str, mirror: tuple[Path, dict[str, str]],
                        tmp_path: Path) -> None:
    """`python -m stages.download` in two projects (run side by side, ~15 s each): one
    downloads and prepares MNIST; one has a wrong checksum, exits 2 with the message, and
    leaves no data/ and no staging folder."""
    from concurrent.futures import ThreadPoolExecutor

    _, md5s = mirror
    wrong = {**md5s, "t10k-images-idx3-ubyte.gz": "f" * 32}
    good = make_project(tmp_path / "good", stage_params(server, md5s))
    bad = make_project(tmp_path / "bad", stage_params(server, wrong))
    with ThreadPoolExecutor(2) as pool:
        good_run, bad_run = pool.map(
            lambda project: run(project, ["python", "-m", "stages.download"],
                                env=no_proxy_env(), check=False), [good, bad])

    assert good_run.returncode == 0, good_run.stderr
    info = json.loads((good / "data" / "split.json").read_text())
    assert info["dataset"] == "mnist" and info["sizes"] == {"train": 54, "val": 6, "test": 20}
    assert info["sources"][0]["source"] == f"{server}/train-images-idx3-ubyte.gz"
    assert (good / ".downloads" / "mnist" / "train-images-idx3-ubyte.gz").exists()
    assert not list(good.glob(".data-*"))

    assert bad_run.returncode == 2, bad_run.stderr
    assert "Traceback" not in bad_run.stderr, bad_run.stderr
    assert (f"error: {bad / '.downloads' / 'mnist' / 't10k-images-idx3-ubyte.gz'}: MD5 mismatch"
            in bad_run.stderr), bad_run.stderr
    assert f"expected {'f' * 32} (data.checksums)" in bad_run.stderr
    assert not (bad / "data").exists() and not list(bad.glob(".data-*"))
    assert not (bad / ".downloads" / "mnist" / "t10k-images-idx3-ubyte.gz").exists()
