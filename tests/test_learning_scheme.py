"""The paper's learning scheme (Sec. 2.2) on a batch-norm network: phase 1 freezes the
classifier, fine-tuning trains a copy, and the classifier's predictions never move;
augmentation reaches training batches only; the learning-rate schedule."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.augment import Augmentation
from pipeline.data import Split
from pipeline.features import (
    AugmentedTargets,
    FeatureDropoutTargets,
    confidence_targets,
    extract,
)
from pipeline.losses import LOSSES
from pipeline.models import Classifier, ConfidNetHead, ConfidNetModel, build_classifier
from pipeline.training import ConfidenceData, FitResult, fit_confidence, train_classifier

CPU = torch.device("cpu")
SHAPE = (3, 32, 32)
AUGMENT = Augmentation(hflip=True, rotate_degrees=15.0, crop_padding=4, pad_value=(-1.0,) * 3)


def split(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, *SHAPE, generator=g), torch.randint(0, 10, (n,), generator=g))


def trained_bn_classifier() -> Classifier:
    """SVHN's SmallConvNet (batch-norm and dropout) with non-trivial running statistics."""
    torch.manual_seed(0)
    model = build_classifier(SHAPE, 10, {"model": "smallconv_svhn", "hidden": 32,
                                         "dropout": 0.3})
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(split(64, 9).x * 2 + 0.5)  # moves the BN running statistics
    return model.eval()


def nothing(epoch: int, row: dict[str, float]) -> None:
    pass


def fit(model: torch.nn.Module, train: ConfidenceData, val: ConfidenceData,
        relabel: AugmentedTargets | None = None, epochs: int = 2) -> FitResult:
    return fit_confidence(model, train, val, LOSSES["mse"], {}, epochs=epochs, lr=1e-3,
                          batch_size=16, device=CPU, seed=0, log=nothing, desc="test",
                          relabel=relabel)


def image_targets(classifier: Classifier, data: Split) -> ConfidenceData:
    return confidence_targets(extract(classifier, data, 256, CPU), "tcp", inputs=data.x)


def test_finetuning_leaves_the_classifier_bit_identical() -> None:
    classifier = trained_bn_classifier()
    train, val = split(48, 1), split(32, 2)
    before_state = copy.deepcopy(classifier.state_dict())
    with torch.no_grad():
        before_logits = classifier(val.x)
    model = ConfidNetModel(classifier, ConfidNetHead(classifier.feature_dim, 16, 2))
    encoder_before = copy.deepcopy(model.encoder.state_dict())
    fit(model, image_targets(classifier, train), image_targets(classifier, val),
        relabel=AugmentedTargets(classifier, AUGMENT, "tcp"))

    with torch.no_grad():
        after_logits = classifier(val.x)
    assert torch.equal(after_logits, before_logits)  # predictions: bit-identical
    for key, value in classifier.state_dict().items():
        assert torch.equal(value, before_state[key]), key
    # ... while the copy did learn (so this test could fail), with BN statistics frozen
    encoder_after = model.encoder.state_dict()
    weights = [k for k in encoder_after if k.endswith("weight")]
    assert any(not torch.equal(encoder_after[k], encoder_before[k]) for k in weights)
    stats = [k for k in encoder_after if k.endswith(("running_mean", "running_var"))]
    assert stats
    for key in stats:
        assert torch.equal(encoder_after[key], encoder_before[key]), key


def test_phase1_no_dropout_matches_cached_features_and_leaves_the_classifier() -> None:
    """Without augmentation, phase 1 on features computed per batch by the frozen
    classifier learns the same head as phase 1 on cached features."""
    classifier = trained_bn_classifier()
    before = copy.deepcopy(classifier.state_dict())
    train, val = split(48, 3), split(32, 4)
    feats = {name: extract(classifier, data, 256, CPU)
             for name, data in (("train", train), ("val", val))}
    torch.manual_seed(5)
    cached_head = ConfidNetHead(classifier.feature_dim, 16, 2)
    fly_head = copy.deepcopy(cached_head)
    validation = confidence_targets(feats["val"], "tcp")
    cached = fit(cached_head, confidence_targets(feats["train"], "tcp"), validation)
    inactive = Augmentation(pad_value=(0.0,) * 3)
    on_the_fly = fit(fly_head, confidence_targets(feats["train"], "tcp", inputs=train.x),
                     validation, relabel=AugmentedTargets(classifier, inactive, "tcp",
                                                          features=True))

    assert [r["val_aupr_error"] for r in on_the_fly.history] == pytest.approx(
        [r["val_aupr_error"] for r in cached.history], abs=1e-6)
    for key, value in fly_head.state_dict().items():
        torch.testing.assert_close(value, cached_head.state_dict()[key], atol=1e-5, rtol=1e-4)
    for key, value in classifier.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_augmented_targets_come_from_the_classifier_on_the_augmented_images() -> None:
    classifier = trained_bn_classifier()
    data = split(16, 6)
    relabel = AugmentedTargets(classifier, AUGMENT, "tcp")
    images, target, correct = relabel(data.x, data.y, torch.Generator().manual_seed(0))
    assert not torch.equal(images, data.x)
    assert torch.equal(images, AUGMENT(data.x, torch.Generator().manual_seed(0)))
    with torch.no_grad():
        probs = torch.softmax(classifier(images).double(), -1)
        features = classifier.encode(images)
    torch.testing.assert_close(target, probs[torch.arange(16), data.y].float())
    assert torch.equal(correct, (probs.argmax(-1) == data.y).long())
    # phase 1 on the fly gets the features of the same augmented images
    as_features = replace(relabel, features=True)
    feats, target_again, _ = as_features(data.x, data.y, torch.Generator().manual_seed(0))
    torch.testing.assert_close(feats, features)
    assert torch.equal(target_again, target)


def test_dropout_variant_samples_the_classifier_with_bn_frozen() -> None:
    """``dropout``: each pass draws other dropout masks (other features and
    targets), batch-norm keeps its running statistics, and the eval variant is fixed."""
    classifier = trained_bn_classifier()
    stats = {k: v.clone() for k, v in classifier.state_dict().items() if "running" in k}
    data = split(16, 8)
    inactive = Augmentation(pad_value=(0.0,) * 3)
    sampled = AugmentedTargets(classifier, inactive, "tcp", features=True, dropout=True)
    fixed = replace(sampled, dropout=False)
    g = torch.Generator().manual_seed(0)
    first, second = sampled(data.x, data.y, g), sampled(data.x, data.y, g)
    assert not torch.equal(first[0], second[0]) and not torch.equal(first[1], second[1])
    assert torch.equal(fixed(data.x, data.y, g)[0], fixed(data.x, data.y, g)[0])
    torch.testing.assert_close(fixed(data.x, data.y, g)[0], classifier.encode(data.x))
    for key, value in classifier.state_dict().items():
        if key in stats:
            assert torch.equal(value, stats[key]), key


@pytest.mark.parametrize("criterion", ["tcp", "tcp_r"])
def test_dropout_on_cached_features_equals_the_full_forward(criterion: str) -> None:
    """The MLP's only dropout acts on its penultimate features, so the authors' phase 1
    (dropout active) computed from the cached eval-mode features and the last layer gives,
    with the same masks, the features and targets of the full forward pass."""
    torch.manual_seed(0)
    mlp = build_classifier((1, 8, 8), 10, {"model": "mlp", "hidden": 64, "dropout": 0.3})
    with torch.no_grad():
        mlp.fc2.weight.mul_(8.0)  # confident and often wrong: targets spread over [0, 1]
    data = Split(torch.randn(256, 1, 8, 8), torch.randint(0, 10, (256,)))
    cached = torch.from_numpy(extract(mlp, data, 256, CPU).features)
    full = AugmentedTargets(mlp, Augmentation(pad_value=(0.0,)), criterion, features=True,
                            dropout=True)
    cheap = FeatureDropoutTargets(mlp, criterion)
    g = torch.Generator()
    torch.manual_seed(5)
    expected = full(data.x, data.y, g)
    torch.manual_seed(5)
    got = cheap(cached, data.y, g)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])
    assert torch.equal(got[2], expected[2])
    assert 0 < int(got[2].sum()) < 256  # the comparison covers errors and correct ones
    eval_target = confidence_targets(extract(mlp, data, 256, CPU), criterion).target
    assert not torch.allclose(got[1], eval_target)  # the masks do change the targets
    torch.manual_seed(6)
    assert not torch.equal(cheap(cached, data.y, g)[0], got[0])  # other masks each batch


@pytest.mark.parametrize(("model", "exact"), [("mlp", True), ("smallconv_mnist", False),
                                              ("smallconv_svhn", False), ("vgg16", False)])
def test_only_the_mlp_has_dropout_on_its_features_alone(model: str, exact: bool) -> None:
    shape = (1, 28, 28) if model in ("mlp", "smallconv_mnist") else SHAPE
    classifier = build_classifier(shape, 10, {"model": model, "hidden": 16, "dropout": 0.3})
    assert classifier.dropout_only_on_features is exact
    if not exact:
        with pytest.raises(ValueError, match="dropout inside its encoder"):
            FeatureDropoutTargets(classifier, "tcp")


def test_relabel_needs_labels() -> None:
    classifier = trained_bn_classifier()
    data = split(8, 7)
    unlabelled = ConfidenceData(data.x, torch.rand(8), torch.ones(8))
    with pytest.raises(ValueError, match="labels"):
        fit(ConfidNetModel(classifier, ConfidNetHead(32, 8, 1)), unlabelled, unlabelled,
            relabel=AugmentedTargets(classifier, AUGMENT, "tcp"))


CFG = {"epochs": 4, "batch_size": 16, "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0,
       "milestones": [2, 3], "gamma": 0.5}


def test_learning_rate_follows_the_milestones() -> None:
    torch.manual_seed(0)
    model = build_classifier((1, 8, 8), 10, {"model": "mlp", "hidden": 16, "dropout": 0.0})
    data = Split(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    result = train_classifier(model, data, data, CFG, CPU, seed=0, log=nothing)
    # epochs are 1-based: the rate drops after epoch 2 and after epoch 3
    assert [row["lr"] for row in result.history] == pytest.approx([0.1, 0.1, 0.05, 0.025])


class SeenInputs(torch.nn.Module):
    """A classifier that records the batches it sees, by mode."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = build_classifier(SHAPE, 10, {"model": "mlp", "hidden": 8, "dropout": 0.0})
        self.seen: dict[bool, list[torch.Tensor]] = {True: [], False: []}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen[self.training].append(x.clone())
        return self.inner(x)


def test_validation_is_measured_on_unaugmented_images() -> None:
    """Training batches are augmented; what the classifier is evaluated on (train and
    validation accuracy, validation loss) is the images as they are (the authors' loader
    augmented validation images; we do not)."""
    torch.manual_seed(0)
    model = SeenInputs()
    train, val = split(40, 10), split(24, 11)
    train_classifier(model, train, val, {**CFG, "epochs": 2, "milestones": []}, CPU, seed=0,
                     log=nothing, augment=AUGMENT)
    evaluated = model.seen[False]
    assert len(evaluated) == 2 * 2  # per epoch: train accuracy; val accuracy and loss
    for batch in evaluated:
        assert torch.equal(batch, train.x) or torch.equal(batch, val.x)
    trained = torch.cat(model.seen[True])
    assert trained.shape[0] == 2 * len(train)
    originals = {tuple(row.flatten()[:5].tolist()) for row in train.x}
    changed = [tuple(row.flatten()[:5].tolist()) not in originals for row in trained]
    assert sum(changed) > len(trained) // 2  # training batches were augmented


MODEL_INPUTS = {"mlp": (1, 28, 28), "smallconv_mnist": (1, 28, 28),
                "smallconv_svhn": (3, 32, 32), "vgg16": (3, 32, 32)}


# Every loss x criterion on the batch-norm SmallConvNet, and every architecture with the
# paper's default (losses only see logits, targets and correctness, whatever the model).
COMBINATIONS = [("smallconv_svhn", loss, criterion) for loss in ("mse", "bce", "focal", "ranking")
                for criterion in ("tcp", "tcp_r")]
COMBINATIONS += [(name, "mse", "tcp") for name in MODEL_INPUTS if name != "smallconv_svhn"]


@pytest.mark.parametrize(("model_name", "loss", "criterion"), COMBINATIONS)
def test_every_loss_and_criterion_trains_on_every_architecture(
        model_name: str, loss: str, criterion: str) -> None:
    """Phase 1 on images (frozen encoder) then fine-tuning, one epoch each, with
    augmentation: finite losses, and the head's weights move."""
    shape = MODEL_INPUTS[model_name]
    torch.manual_seed(0)
    classifier = build_classifier(shape, 10, {"model": model_name, "hidden": 16,
                                              "dropout": 0.3}).eval()
    g = torch.Generator().manual_seed(1)
    data = Split(torch.randn(12, *shape, generator=g), torch.randint(0, 10, (12,), generator=g))
    targets = confidence_targets(extract(classifier, data, 64, CPU), criterion, inputs=data.x)
    augment = Augmentation(hflip=True, crop_padding=2, pad_value=(0.0,) * shape[0])
    head = ConfidNetHead(classifier.feature_dim, 8, 2)
    kwargs = {"focal_alpha": 0.25, "focal_gamma": 5.0} if loss == "focal" else {}
    phases = {  # phase 1 on the fly (head on augmented features), then fine-tuning
        "phase 1": (head, AugmentedTargets(classifier, augment, criterion, features=True)),
        "fine-tuning": (ConfidNetModel(classifier, head),
                        AugmentedTargets(classifier, augment, criterion)),
    }
    for phase, (model, relabel) in phases.items():
        start = copy.deepcopy(head.state_dict())
        validation = targets if phase == "fine-tuning" else confidence_targets(
            extract(classifier, data, 64, CPU), criterion)
        result = fit_confidence(model, targets, validation, LOSSES[loss], kwargs, epochs=1,
                                lr=1e-2, batch_size=4, device=CPU, seed=0, log=nothing,
                                desc="test", relabel=relabel)
        assert np.isfinite(result.history[-1]["train_loss"]), phase
        assert any(not torch.equal(v, start[k]) for k, v in head.state_dict().items()), phase
