"""Per-pixel outputs of a segmentation model (CamVid, paper Table 1 and Fig. 5), computed
image batch by image batch so that memory grows with the per-pixel arrays kept (a few
bytes per non-void pixel and method), never with logits or feature maps of whole splits.

Every per-pixel array lists the non-void pixels of a split, images in split order, pixels
row-major within an image: the order of ``features/{split}.npz`` (``valid``) and of the
scores files.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.baselines import (
    SCORERS,
    ClassIndexes,
    ScoringContext,
    mc_dropout_probabilities,
)
from pipeline.models import Classifier
from pipeline.outputs import PixelFeatures
from pipeline.prepared import Split
from pipeline.training import SEGMENTATION_EVAL_BATCH

# Scoring functions that cannot run per pixel, and why (the baselines stage skips them).
SKIPPED_SCORERS: dict[str, str] = {
    "mcp_temperature": "fits its temperature on every validation logit, which segmentation "
                       "does not keep (63 million pixels x 11 classes)",
}


def image_batches(split: Split, device: torch.device,
                  batch: int = SEGMENTATION_EVAL_BATCH
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(images, labels, index)`` of ``split`` in order, ``batch`` images at a time, the
    images on ``device``."""
    for start in range(0, len(split), batch):
        index = torch.arange(start, min(start + batch, len(split)))
        yield split.x[index].to(device), split.y[index], index


def valid_mask(labels: torch.Tensor, void_label: int) -> torch.Tensor:
    return labels != void_label


def channels_last(maps: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The (P, C) rows of (B, C, H, W) ``maps`` at the True pixels of ``keep`` (B, H, W),
    in row-major pixel order."""
    return maps.permute(0, 2, 3, 1)[keep.to(maps.device)]


@torch.no_grad()
def pixel_features(classifier: Classifier, split: Split, void_label: int,
                   device: torch.device) -> PixelFeatures:
    """The label and prediction of every non-void pixel of ``split`` (eval mode)."""
    classifier.eval()
    labels, predictions, valid = [], [], []
    for images, y, _ in image_batches(split, device):
        keep = valid_mask(y, void_label)
        predicted = classifier(images).argmax(1).cpu()
        labels.append(y[keep].to(torch.int16))
        predictions.append(predicted[keep].to(torch.int16))
        valid.append(keep)
    return PixelFeatures(torch.cat(labels).numpy(), torch.cat(predictions).numpy(),
                         torch.cat(valid).numpy())


@torch.no_grad()
def pixel_confidences(model: Callable[[torch.Tensor], torch.Tensor], split: Split,
                      void_label: int, device: torch.device) -> np.ndarray:
    """``sigmoid(model(images))`` (a (B, H, W) confidence logit per pixel) at every
    non-void pixel of ``split``, float32 (P,)."""
    if isinstance(model, nn.Module):
        model.eval()
    out = []
    for images, y, _ in image_batches(split, device):
        logits = model(images).float().cpu()
        out.append(torch.sigmoid(logits[valid_mask(y, void_label)]))
    return torch.cat(out).numpy().astype(np.float32)


class FrozenEncoderHead(nn.Module):
    """Phase 1's confidence of a segmentation model for scoring: ``head`` over the frozen
    classifier's decoder features (eval mode, no dropout)."""

    def __init__(self, classifier: Classifier, head: nn.Module) -> None:
        super().__init__()
        self.classifier, self.head = classifier, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.classifier.eval()
        return self.head(self.classifier.encode(images))


@torch.no_grad()
def sample_training_pixels(classifier: Classifier, split: Split, void_label: int,
                           size: int, seed: int, device: torch.device
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Decoder features (float32 (S, D)) and labels (S,) of ``size`` training pixels drawn
    uniformly without replacement among the non-void ones (all of them if fewer), by a
    generator seeded with ``seed``: TrustScore's training set for segmentation (the
    authors also subsampled pixels; exact search over all of them is out of reach)."""
    classifier.eval()
    valid = valid_mask(split.y, void_label)
    counts = valid.flatten(1).sum(1).numpy()
    total = int(counts.sum())
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(size, total), replace=False))
    bounds = np.concatenate([[0], np.cumsum(counts)])
    features, labels = [], []
    for images, y, index in image_batches(split, device):
        keep = valid_mask(y, void_label)
        lo, hi = bounds[int(index[0])], bounds[int(index[-1]) + 1]
        picked = chosen[(chosen >= lo) & (chosen < hi)] - lo
        if not len(picked):
            continue
        rows = channels_last(classifier.encode(images).float(), keep).cpu()
        features.append(rows[torch.from_numpy(picked)])
        labels.append(y[keep][torch.from_numpy(picked)])
    return (torch.cat(features).numpy().astype(np.float32),
            torch.cat(labels).numpy().astype(np.int64))


@torch.no_grad()
def pixel_baselines(classifier: Classifier, split: Split, void_label: int,
                    neighbours: ClassIndexes, params: dict[str, Any], seed: int,
                    device: torch.device, scorers: list[str]) -> dict[str, np.ndarray]:
    """Every scoring function of ``scorers`` at every non-void pixel of ``split``, float32
    (P,) each. Per image batch: eval-mode logits and decoder features, the MC Dropout
    passes (``params['mc_samples']``, at most ``params['batch_size']`` images per forward
    pass, masks seeded by ``seed`` and the batch), and a :class:`ScoringContext` of that
    batch's pixels (logits (P_b, K), features (P_b, D)) which the registered scorers read
    as they read a classification split. TrustScore searches ``neighbours`` exactly."""
    classifier.eval()
    scores: dict[str, list[np.ndarray]] = {name: [] for name in scorers}
    samples = int(params.get("mc_samples", 50))
    per_pass = max(1, int(params.get("batch_size", 4096)))
    for number, (images, y, _) in enumerate(image_batches(split, device)):
        keep = valid_mask(y, void_label)
        features = classifier.encode(images)
        logits = channels_last(classifier.classify(features).float(), keep).cpu()
        mc: torch.Tensor | None = None
        if any(name.startswith("mc_dropout") for name in scorers):
            mc = mc_dropout_pixels(classifier, images, keep, samples, per_pass, device,
                                   seed * 1_000_003 + number)
        ctx = ScoringContext(
            logits=logits.numpy(), labels=y[keep].numpy(),
            features=channels_last(features.float(), keep).cpu().numpy(),
            train_features=np.empty((0, features.shape[1]), np.float32),
            train_labels=np.empty(0, np.int64), device=device, seed=seed, params=params,
            precomputed_mc=mc, neighbours=neighbours)
        for name in scorers:
            scores[name].append(np.asarray(SCORERS[name](ctx), dtype=np.float32))
    return {name: np.concatenate(parts) for name, parts in scores.items()}


def mc_dropout_pixels(classifier: Classifier, images: torch.Tensor, keep: torch.Tensor,
                      samples: int, per_pass: int, device: torch.device,
                      seed: int) -> torch.Tensor:
    """Softmax of ``samples`` MC Dropout passes at the non-void pixels of ``images``:
    (samples, P_b, K). The passes of one image run in batches of at most ``per_pass``
    copies (:func:`pipeline.baselines.mc_dropout_probabilities` per image)."""
    passes = []
    was_training = classifier.training
    for i in range(len(images)):
        image_keep = keep[i]
        per_image = []
        for start in range(0, samples, per_pass):
            count = min(per_pass, samples - start)
            # the wrapper takes the classifier's mode, which the passes restore on exit
            wrapper = _PixelClassifier(classifier, image_keep).train(was_training)
            probs = mc_dropout_probabilities(wrapper,
                                             images[i:i + 1], samples=count, batch_size=count,
                                             device=device, seed=seed + 7919 * (i * samples
                                                                                + start))
            # (count, 1, P_i * K) -> (count, P_i, K)
            per_image.append(probs[:, 0].reshape(count, int(image_keep.sum()), -1))
        passes.append(torch.cat(per_image))
    return torch.cat(passes, dim=1)


class _PixelClassifier(Classifier):
    """A segmentation classifier seen as a classifier of one image's non-void pixels:
    ``forward`` gives (B, P, K) logits, what MC Dropout's batched passes average."""

    def __init__(self, classifier: Classifier, keep: torch.Tensor) -> None:
        super().__init__()
        self.inner, self.keep = classifier, keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.inner(x).float().permute(0, 2, 3, 1)
        return logits[:, self.keep.to(x.device)]
