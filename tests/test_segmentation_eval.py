"""Evaluating a segmentation (the CamVid setting): the image (cluster) bootstrap of
``pipeline.metrics.bootstrap_draws`` against materialised resamples and against the pixel
bootstrap, mIoU and pixel accuracy against scikit-learn, the headline's ``test/miou``, and
the evaluate and report stages on a small segmentation written in the stages' formats
(every number and the Fig. 5 image)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import table_row, table_rows
from sklearn.metrics import accuracy_score, jaccard_score

from pipeline import metrics as M
from pipeline.camvid_labels import CLASSES, VOID
from pipeline.headline import headline
from pipeline.io import atomic_write_json, atomic_write_npz
from pipeline.metrics import (
    METRIC_NAMES,
    bootstrap_draws,
    failure_metrics,
    group_resample_counts,
    percentile_interval,
    segmentation_scores,
)
from pipeline.outputs import load_features
from pipeline.tracking import StageRun


def _pixels(seed: int, images: int = 6, ties: bool = True,
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Confidence, correctness and the image of each pixel; images of unequal sizes with
    ids that skip values (an image with no labelled pixel)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 15, images)
    groups = np.repeat(np.arange(images) * 2, sizes)
    confidence = rng.random(groups.size)
    if ties:
        confidence = np.round(confidence, 1)
    correct = (rng.random(groups.size) < 0.65).astype(int)
    return confidence, correct, groups


def _materialised(confidence: np.ndarray, correct: np.ndarray, groups: np.ndarray,
                  counts: np.ndarray) -> list[float]:
    """Every metric of one resample built pixel by pixel: each image repeated as often
    as it was drawn."""
    ids = np.unique(groups)
    index = np.concatenate([np.tile(np.flatnonzero(groups == ids[g]), counts[g])
                            for g in range(ids.size)])
    values = failure_metrics(confidence[index], correct[index])
    return [values[name] for name in METRIC_NAMES]


@pytest.mark.parametrize("seed", range(4))
def test_grouped_draws_are_the_metrics_of_materialised_image_resamples(seed: int) -> None:
    confidence, correct, groups = _pixels(seed)
    draws = bootstrap_draws({"a": confidence}, correct, 30, seed, groups=groups)["a"]
    counts = group_resample_counts(np.unique(groups).size, 30, seed)
    for i in range(30):
        np.testing.assert_allclose(draws[i], _materialised(confidence, correct, groups,
                                                           counts[i]),
                                   rtol=0, atol=1e-12, err_msg=f"resample {i}")


def test_grouped_draws_of_two_methods_share_their_resamples() -> None:
    """The paired differences come from the same image draws: each method's draws are
    those it gets alone, and a method against itself differs by exactly zero."""
    confidence, correct, groups = _pixels(7)
    other = np.random.default_rng(1).random(confidence.size)
    both = bootstrap_draws({"a": confidence, "b": other, "c": confidence}, correct, 40, 3,
                           groups=groups)
    alone = bootstrap_draws({"b": other}, correct, 40, 3, groups=groups)
    np.testing.assert_array_equal(both["b"], alone["b"])
    np.testing.assert_array_equal(both["a"], both["c"])
    assert not np.array_equal(both["a"], both["b"])


def test_image_bootstrap_is_wider_than_the_pixel_bootstrap_when_pixels_move_together() -> None:
    """Pixels of one image perfectly correlated (all right or all wrong, one score per
    image): 40 images of 50 pixels hold the information of 40 samples, not 2,000. The
    pixel bootstrap takes them for 2,000 independent samples and gives a far narrower
    interval; resampling whole images gives the interval of the 40."""
    rng = np.random.default_rng(0)
    images, per_image = 40, 50
    image_correct = (rng.random(images) < 0.6).astype(int)
    image_score = rng.random(images) + 0.3 * image_correct
    groups = np.repeat(np.arange(images), per_image)
    correct = image_correct[groups]
    confidence = image_score[groups] + 1e-6 * rng.random(groups.size)
    j = METRIC_NAMES.index("aupr_error")
    pixel = percentile_interval(bootstrap_draws({"a": confidence}, correct, 200, 1)["a"][:, j])
    image = percentile_interval(
        bootstrap_draws({"a": confidence}, correct, 200, 1, groups=groups)["a"][:, j])
    one_per_image = percentile_interval(
        bootstrap_draws({"a": image_score}, image_correct, 200, 1)["a"][:, j])
    assert image[1] - image[0] > 3 * (pixel[1] - pixel[0])
    # ... and about as wide as the bootstrap of one sample per image
    assert 0.5 < (image[1] - image[0]) / (one_per_image[1] - one_per_image[0]) < 2


def test_one_pixel_per_image_is_the_ordinary_bootstrap_in_distribution() -> None:
    confidence, correct, _ = _pixels(3, images=1)
    rng = np.random.default_rng(5)
    confidence, correct = rng.random(300), (rng.random(300) < 0.7).astype(int)
    j = METRIC_NAMES.index("auroc")
    pixel = bootstrap_draws({"a": confidence}, correct, 400, 2)["a"][:, j]
    image = bootstrap_draws({"a": confidence}, correct, 400, 2,
                            groups=np.arange(300))["a"][:, j]
    assert abs(pixel.std() - image.std()) < 0.25 * pixel.std()
    assert abs(pixel.mean() - image.mean()) < 0.5 * pixel.std()


def test_rank_bins_never_split_ties_and_converge_to_the_exact_draws() -> None:
    rng = np.random.default_rng(2)
    groups = np.repeat(np.arange(20), 200)
    confidence = np.round(rng.random(groups.size), 3)  # about 1,000 distinct scores
    confidence[:700] = 0.5  # one big tie straddling any bin edge
    correct = (rng.random(groups.size) < confidence + 0.2).astype(int)
    exact = bootstrap_draws({"a": confidence}, correct, 20, 0, groups=groups)["a"]
    coarse = bootstrap_draws({"a": confidence}, correct, 20, 0, groups=groups,
                             resolution=64)["a"]
    fine = bootstrap_draws({"a": confidence}, correct, 20, 0, groups=groups,
                           resolution=512)["a"]
    gap_coarse = np.nanmax(np.abs(coarse - exact), axis=0)
    gap_fine = np.nanmax(np.abs(fine - exact), axis=0)
    j = METRIC_NAMES.index("auroc")
    assert 0 < gap_fine[j] < gap_coarse[j] < 0.02
    assert gap_coarse[METRIC_NAMES.index("accuracy")] == 0
    # the tie of 700 pixels lands whole in one bin: a bin holding part of it would
    # count tied pixels above others
    group, n_groups = M._compact_groups(groups, groups.size)
    bins = M._RankBins.of(confidence, correct, group, n_groups, 64)
    tie_bins = np.flatnonzero((bins.correct + bins.errors).sum(axis=0) >= 700)
    assert tie_bins.size == 1


def test_closed_form_oracle_is_the_per_sample_sum() -> None:
    for n_correct, n in [(0, 1), (1, 1), (3, 5), (0, 7), (997, 1000), (12345, 20000)]:
        assert math.isclose(M._oracle_aurc_closed_form(n_correct, n),
                            M._oracle_aurc(n_correct, n), rel_tol=1e-12, abs_tol=1e-15)


@pytest.mark.parametrize(("groups", "message"), [
    (np.zeros(3, dtype=int), "groups has 3 samples but correct has 4"),
    (np.array([0, 1, -1, 2]), "groups must be non-negative, got -1"),
    (np.array([0.0, 1.0, 1.0, 2.0]), "groups must hold integers"),
])
def test_bad_groups_raise_naming_the_problem(groups: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        bootstrap_draws({"a": np.arange(4.0)}, np.array([1, 0, 1, 1]), 5, 0, groups=groups)


def test_segmentation_scores_hand_case() -> None:
    # class 0: TP 2, FN 1 (a 0 called 1), FP 0 -> IoU 2/3
    # class 1: TP 1, FN 1 (a 1 called 2), FP 1 -> 1/3; class 2 absent from labels, predicted once:
    # TP 0, FP 1 -> IoU 0 (counted); class 3 absent from both -> ignored
    labels = np.array([0, 0, 0, 1, 1])
    predictions = np.array([0, 0, 1, 1, 2])
    scores = segmentation_scores(labels, predictions, 4)
    assert scores["per_class_iou"] == [2 / 3, 1 / 3, 0.0, None]
    assert scores["miou"] == pytest.approx((2 / 3 + 1 / 3 + 0) / 3)
    assert scores["pixel_accuracy"] == pytest.approx(3 / 5)
    assert scores["class_accuracy"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert scores["pixels"] == 5


def test_segmentation_scores_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 11, 5000)
    predictions = np.where(rng.random(5000) < 0.7, labels, rng.integers(0, 11, 5000))
    predictions[predictions == 9] = 8  # class 9 never predicted, still in the labels
    scores = segmentation_scores(labels, predictions, 11)
    present = np.unique(np.r_[labels, predictions])
    assert scores["miou"] == pytest.approx(jaccard_score(labels, predictions, labels=present,
                                                         average="macro"))
    assert scores["pixel_accuracy"] == pytest.approx(accuracy_score(labels, predictions))


@pytest.mark.parametrize(("labels", "predictions", "message"), [
    (np.array([0, 11]), np.array([0, 1]), "labels holds class 11; valid classes: 0..10"),
    (np.array([0, 1]), np.array([0, -1]), "predictions holds class -1"),
    (np.array([0, 1]), np.array([0]), "labels has 2 pixels but predictions has 1"),
    (np.array([], dtype=int), np.array([], dtype=int), "at least one labelled pixel"),
])
def test_segmentation_scores_reject_bad_input(labels: np.ndarray, predictions: np.ndarray,
                                              message: str) -> None:
    with pytest.raises(ValueError, match=message):
        segmentation_scores(labels, predictions, 11)


def _evaluation(segmentation: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    metrics = {name: 0.5 for name in METRIC_NAMES}
    test: dict[str, Any] = {"methods": {m: dict(metrics) for m in
                                        ("confidnet_finetuned", "mcp", "trustscore")},
                            "errors": 12, "size": 100}
    if segmentation:
        test["segmentation"] = {"miou": 0.61, "pixel_accuracy": 0.88}
    paired = {"difference": 0.01, "ci_low": -0.01, "ci_high": 0.03}
    return test, {"confidnet_finetuned": {"mcp": {"aupr_error": paired}}}


def test_headline_has_miou_only_for_a_segmentation() -> None:
    classification = headline(*_evaluation(False))
    segmentation = headline(*_evaluation(True))
    assert list(segmentation) == [*classification, "test/miou"]
    assert segmentation["test/miou"] == 0.61
    assert "test/miou" not in classification


# --- the evaluate and report stages on a small segmentation ----------------------------

IMAGES, HEIGHT, WIDTH = 5, 12, 16


def _write_segmentation(root: Path) -> dict[str, Any]:
    """features/, scores/, metrics/ and data/split.json as the stages before evaluate and
    report write them for a segmentation; returns params."""
    rng = np.random.default_rng(0)
    splits = {}
    for split in ("train", "val", "test"):
        labels = rng.integers(0, 11, (IMAGES, HEIGHT, WIDTH)).astype(np.uint8)
        labels[:, :2] = VOID  # the top rows unlabelled
        valid = labels != VOID
        pixel_labels = labels[valid].astype(np.int16)
        # errors in blocks: a whole image region wrong, as a segmentation errs
        wrong = np.zeros_like(labels, dtype=bool)
        for i in range(IMAGES):
            top, left = rng.integers(2, HEIGHT - 4), rng.integers(0, WIDTH - 6)
            wrong[i, top:top + 4, left:left + 6] = True
        predictions = np.where(wrong[valid], (pixel_labels + 1) % 11, pixel_labels)
        atomic_write_npz(root / f"features/{split}.npz", labels=pixel_labels,
                         predictions=predictions.astype(np.int16), valid=valid)
        splits[split] = (labels, valid, predictions == pixel_labels)
    images = rng.integers(0, 256, (3, HEIGHT, WIDTH, 3)).astype(np.uint8)
    atomic_write_npz(root / "features/figure_images.npz", images=images,
                     labels=splits["test"][0][:3])

    def scores(quality: float) -> dict[str, np.ndarray]:
        out = {}
        for split in ("val", "test"):
            correct = splits[split][2]
            out[split] = np.clip(quality * correct + rng.random(correct.size), 0, 1
                                 ).astype(np.float32)
        return out

    for name, quality in (("mcp", 0.5), ("mc_dropout", 0.5), ("trustscore", 0.2),
                          ("tcp_oracle", 2.0)):
        atomic_write_npz(root / f"scores/baselines/{name}.npz", **scores(quality))
    atomic_write_npz(root / "scores/confidnet.npz", **scores(0.6))
    atomic_write_npz(root / "scores/confidnet_finetuned.npz", **scores(0.7))
    atomic_write_json(root / "metrics/classifier.json", {"best_epoch": 4, "val_accuracy": 0.8,
                                                          "val_miou": 0.5})
    atomic_write_json(root / "metrics/train_confidnet.json",
                      {"best_epoch": 2, "train_errors": 120, "train_size": 800})
    atomic_write_json(root / "metrics/finetune.json", {
        "best_epoch": 1, "val_aupr_error_before": 0.3, "val_aupr_error": 0.32})
    atomic_write_json(root / "data/split.json", {
        "dataset": "camvid", "sizes": {"train": 367, "val": 101, "test": 233}})
    return {"task": "segmentation", "setting": "camvid_segnet", "seed": 0,
            "classifier": {"model": "segnet"}, "loss": "mse", "criterion": "tcp",
            "evaluate": {"bootstrap_resamples": 50},
            "baselines": {"trustscore_train_pixels": 200000},
            "report": {"figure_images": 2}, "tracking": {"experiment": "camvid"}}


def test_evaluate_and_report_stages_on_a_segmentation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from stages import evaluate, report

    params = _write_segmentation(tmp_path)
    monkeypatch.chdir(tmp_path)
    features = load_features("test")
    assert features.groups is not None and features.valid is not None
    assert np.array_equal(np.bincount(features.groups), features.valid.sum(axis=(1, 2)))

    evaluate.body(params, StageRun("evaluate"))
    results = json.loads(Path("metrics/evaluate.json").read_text())
    expected = segmentation_scores(features.labels, features.predictions, len(CLASSES))
    assert results["segmentation"] == expected  # JSON keeps every float exactly
    assert results["bootstrap"]["unit"] == "image" and results["bootstrap"]["images"] == 5
    assert results["size"] == features.labels.size
    top = json.loads(Path("metrics/headline.json").read_text())
    assert top["test/miou"] == pytest.approx(expected["miou"])
    # the intervals are the image bootstrap's
    intervals = json.loads(Path("metrics/intervals.json").read_text())
    scores = np.load("scores/baselines/mcp.npz")["test"]
    draws = bootstrap_draws({"mcp": scores}, features.correct, 50, 0,
                            groups=features.groups)["mcp"]
    j = METRIC_NAMES.index("aupr_error")
    assert intervals["mcp"]["aupr_error"] == pytest.approx(
        list(percentile_interval(draws[:, j])))

    text = report.render(params)
    assert "epoch 4 kept on validation mean IoU (50.00%; pixel accuracy 80.00%)" in text
    assert "# Failure prediction with ConfidNet: `camvid_segnet`" in text
    assert "misclassified pixels among" in text and "labelled test pixels" in text
    assert "**The bootstrap resamples whole images, not pixels**: each resample draws 5 " \
           "test images with replacement" in text
    assert "Paired bootstrap over the 5 test images, resampled whole with their " \
           f"{features.labels.size} labelled pixels (50 resamples" in text
    assert f"labelled pixels of the {IMAGES} test images" in text
    assert "**200000 training pixels** (`baselines.trustscore_train_pixels`)" in text
    assert f"mIoU **{100 * expected['miou']:.2f}%**" in text
    header, iou = table_rows(text.split("IoU per class:")[1].split("##")[0])
    assert header == list(CLASSES)
    assert iou == [("n/a" if v is None else f"{100 * v:.2f}")
                   for v in expected["per_class_iou"]]
    beside = text.split("### Ours beside the paper's, CamVid SegNet")[1].split("##")[0]
    assert table_row(beside, "MCP (baseline)")[0].endswith("(63.87)")
    assert table_row(beside, "TrustScore")[0].endswith("(n/a)")
    assert "(figures/segmentation_examples.png)" in text
    figure = Path("reports/figures/segmentation_examples.png")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    prose = text.split("```yaml")[0]
    assert "{" not in prose and "}" not in prose
