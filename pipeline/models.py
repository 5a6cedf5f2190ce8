"""Classifiers and the ConfidNet confidence network (paper Sec. 2.2, Fig. 2).

Every classifier splits into ``encode`` (input -> penultimate features, the 'ConvNet'
of Fig. 2) and ``classify`` (features -> logits), so ConfidNet can read the features
and fine-tuning can copy the encoder alone.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.registry import Registry


class Classifier(nn.Module):
    """A classifier ``classify(encode(x))`` with a known feature width."""

    feature_dim: int

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.encode(x))


ClassifierBuilder = Callable[[tuple[int, ...], int, dict[str, Any]], Classifier]
MODELS: Registry[ClassifierBuilder] = Registry("model")


class MLP(Classifier):
    """The paper's MNIST MLP: flatten -> fc(hidden) -> ReLU -> dropout -> fc(classes).

    The penultimate features are the hidden activations (after dropout, which is the
    identity in eval mode), so MC Dropout samples the same layer the features come from.
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int,
                 dropout: float) -> None:
        super().__init__()
        self.feature_dim = hidden
        self.fc1 = nn.Linear(math.prod(input_shape), hidden)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, num_classes)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(torch.relu(self.fc1(x.flatten(1))))

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(features)


@MODELS.register("mlp")
def build_mlp(input_shape: tuple[int, ...], num_classes: int, cfg: dict[str, Any]) -> Classifier:
    return MLP(input_shape, num_classes, hidden=cfg["hidden"], dropout=cfg["dropout"])


def build_classifier(input_shape: tuple[int, ...], num_classes: int,
                     cfg: dict[str, Any]) -> Classifier:
    return MODELS[cfg["model"]](tuple(input_shape), num_classes, cfg)


def load_classifier(path: Path, input_shape: tuple[int, ...], num_classes: int,
                    cfg: dict[str, Any]) -> Classifier:
    """A classifier saved by the ``train_classifier`` stage, in eval mode, on the CPU.
    ``weights_only=True``: a weights file never runs code when loaded."""
    classifier = build_classifier(input_shape, num_classes, cfg)
    classifier.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return classifier.eval()


class ConfidNetHead(nn.Module):
    """ConfidNet for classification: ``layers`` dense layers of ``width`` units with ReLU,
    then one output unit (paper Sec. 3.1: 5 dense layers; the authors use width 400).

    ``forward`` returns the pre-sigmoid logit ``u``; the confidence is ``sigmoid(u)``.
    Losses take the logit for numerical stability.
    """

    def __init__(self, in_features: int, width: int = 400, layers: int = 4) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        size = in_features
        for _ in range(layers):
            blocks += [nn.Linear(size, width), nn.ReLU()]
            size = width
        blocks.append(nn.Linear(size, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


class ConfidNetModel(nn.Module):
    """Fine-tuning phase (paper Sec. 2.2, 'Learning scheme'): a *copy* of the classifier's
    encoder plus the ConfidNet head, trained end to end.

    The original classifier is not part of this module, so its predictions cannot move.
    The encoder copy always runs in eval mode: dropout off and batch-norm statistics
    frozen, as the paper prescribes; gradients still flow through it.
    """

    def __init__(self, classifier: Classifier, head: ConfidNetHead) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(classifier)
        self.head = head
        self.train(self.training)

    def train(self, mode: bool = True) -> ConfidNetModel:
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder.encode(x))


def enable_mc_dropout(model: nn.Module) -> None:
    """Eval mode everywhere (batch-norm uses running statistics) except dropout layers."""
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.train()

