"""Penultimate features, logits and labels of the frozen classifier, extracted once so
later stages never rerun the classifier for them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pipeline.augment import Augmentation, flip_pairs
from pipeline.losses import CRITERIA
from pipeline.models import Classifier, enable_mc_dropout
from pipeline.outputs import Features, load_features, save_features  # noqa: F401  (re-exported)
from pipeline.prepared import Split
from pipeline.runtime import compute
from pipeline.training import ConfidenceData, batches


@torch.no_grad()
def extract(classifier: Classifier, split: Split, batch_size: int,
            device: torch.device) -> Features:
    """The classifier's features and logits of ``split`` in eval mode: the images moved to
    ``device`` once, both outputs gathered there and copied back once."""
    classifier.eval()
    settings = compute()
    images = settings.place(split.x, device)
    feats, logits = [], []
    with settings.autocast(device):
        for idx in batches(len(split), batch_size, None, device):
            f = classifier.encode(images[idx])
            feats.append(f.float())
            logits.append(classifier.classify(f).float())
    return Features(torch.cat(feats).cpu().numpy(), torch.cat(logits).cpu().numpy(),
                    split.y.numpy())


def criterion_targets(logits: torch.Tensor, labels: torch.Tensor,
                      criterion: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The criterion value (TCP, eq. 2, or TCP^r, eq. 3) of the classifier's ``logits``
    (classes on the last axis), computed in float64, and whether its prediction is correct
    (int64)."""
    probs = torch.softmax(logits.double(), dim=-1)
    target = CRITERIA[criterion](probs, labels).float()
    return target, (logits.argmax(dim=-1) == labels).long()


def confidence_targets(features: Features, criterion: str,
                       inputs: torch.Tensor | None = None) -> ConfidenceData:
    """Targets for ConfidNet from the frozen classifier's logits: the criterion value
    (TCP or TCP^r) and correctness. ``inputs`` defaults to the features (phase 1)."""
    labels = torch.from_numpy(features.labels)
    target, correct = criterion_targets(torch.from_numpy(features.logits), labels, criterion)
    return ConfidenceData(
        inputs=torch.from_numpy(features.features) if inputs is None else inputs,
        target=target, correct=correct, labels=labels,
    )


@dataclass(frozen=True)
class FeatureDropoutTargets:
    """The authors' phase 1 (classifier dropout active) computed from cached features,
    for classifiers whose only dropout acts on the penultimate features (the MLP):
    ``encode`` in train mode is ``feature_dropout(f)`` of the eval-mode features ``f``, so
    the perturbed features and their TCP target are one mask and the last layer away, with
    no encoder pass. Draws the masks from torch's global generator as ``nn.Dropout`` does,
    so the same seed gives the same masks, features and targets as the full forward
    (:class:`AugmentedTargets` with ``dropout`` and no augmentation)."""

    classifier: Classifier
    criterion: str

    def __post_init__(self) -> None:
        if not self.classifier.dropout_only_on_features:
            raise ValueError(f"{type(self.classifier).__name__} has dropout inside its "
                             "encoder; perturbed features need a full forward pass "
                             "(AugmentedTargets with dropout=True)")

    @torch.no_grad()
    def __call__(self, features: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dropout = self.classifier.feature_dropout
        assert dropout is not None  # checked in __post_init__
        perturbed = nn.functional.dropout(features, dropout.p, training=True)
        target, correct = criterion_targets(self.classifier.classify(perturbed).float(), labels,
                                            self.criterion)
        return perturbed, target, correct


def frozen_mode(classifier: Classifier, dropout: bool) -> None:
    """The frozen classifier's mode when it recomputes targets: batch-norm in eval mode,
    its dropout active with ``dropout`` (the authors' phase 1), else plain eval."""
    if dropout:
        enable_mc_dropout(classifier)
    else:
        classifier.eval()


@dataclass(frozen=True)
class AugmentedTargets:
    """Targets for a batch of *augmented* training images, as the authors' loaders give
    ConfidNet in both phases: augment the images, run the frozen classifier on them (eval
    mode, no gradient) and take the criterion of its output on what it actually sees.

    Returns the augmented images (fine-tuning: the encoder copy reads them) or, with
    ``features``, the frozen classifier's penultimate features of them (phase 1: the head
    reads them, one encoder pass per batch). Cached features are of unaugmented images;
    with an inactive augmentation both agree."""

    classifier: Classifier
    augment: Augmentation
    criterion: str
    features: bool = False
    # Keep the classifier's dropout active (batch-norm stays in eval mode): features and
    # targets then vary from pass to pass, as in a phase 1 that leaves dropout on.
    dropout: bool = False

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        frozen_mode(self.classifier, self.dropout)
        augmented = self.augment(images, generator)
        features = self.classifier.encode(augmented)
        target, correct = criterion_targets(self.classifier.classify(features).float(), labels,
                                            self.criterion)
        return (features.float() if self.features else augmented), target, correct


@dataclass(frozen=True)
class SegmentationTargets:
    """Per-pixel targets for ConfidNet on a segmentation model, recomputed for every
    training batch as :class:`AugmentedTargets` does for images: flip images and label maps
    together (``hflip``), run the frozen classifier (its dropout active with ``dropout``,
    the authors' phase 1; batch-norm in eval mode) and take the criterion of each pixel's
    prediction. Returns the flipped images (fine-tuning) or, with ``features``, the
    decoder's feature maps (phase 1), the target (B, H, W) and ``correct`` (B, H, W), -1
    on void pixels, which the loss leaves out (:func:`pipeline.training.fit_confidence`)."""

    classifier: Classifier
    criterion: str
    void_label: int
    hflip: bool
    features: bool = False
    dropout: bool = False

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        frozen_mode(self.classifier, self.dropout)
        if self.hflip:
            images, labels = flip_pairs(images, labels, generator)
        features = self.classifier.encode(images)
        logits = self.classifier.classify(features).float().permute(0, 2, 3, 1)
        void = labels == self.void_label
        target, correct = criterion_targets(logits, labels.masked_fill(void, 0), self.criterion)
        return ((features.float() if self.features else images), target.masked_fill(void, 0.0),
                correct.masked_fill(void, -1))
