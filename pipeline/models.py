"""Classifiers and the ConfidNet confidence network (paper Sec. 2.2, Fig. 2).

Every classifier splits into ``encode`` (input -> penultimate features, the 'ConvNet'
of Fig. 2) and ``classify`` (features -> logits), so ConfidNet can read the features
and fine-tuning can copy the encoder alone.
"""

from __future__ import annotations

import copy
import math
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from pipeline.registry import Registry


class Classifier(nn.Module):
    """A classifier ``classify(encode(x))`` with a known feature width. A segmentation
    model (``per_pixel``) classifies every pixel: ``encode`` gives (N, feature_dim, H, W)
    feature maps and ``classify`` (N, K, H, W) logits."""

    feature_dim: int
    per_pixel: ClassVar[bool] = False

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.encode(x))

    @property
    def feature_dropout(self) -> nn.Dropout | None:
        """The dropout that ``encode`` applies last, to the penultimate features."""
        return None

    @property
    def dropout_only_on_features(self) -> bool:
        """Whether :attr:`feature_dropout` is the classifier's only dropout. Then a
        dropout-perturbed forward pass (MC Dropout, the authors' phase 1) is exactly
        ``classify(feature_dropout(f))`` of the eval-mode features ``f``: no encoder pass."""
        last = self.feature_dropout
        return last is not None and all(
            m is last for m in self.modules() if isinstance(m, nn.modules.dropout._DropoutNd))


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

    @property
    def feature_dropout(self) -> nn.Dropout:
        return self.dropout

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(features)


@MODELS.register("mlp")
def build_mlp(input_shape: tuple[int, ...], num_classes: int, cfg: dict[str, Any]) -> Classifier:
    return MLP(input_shape, num_classes, hidden=cfg["hidden"], dropout=cfg["dropout"])


# ------------------------------------------------------------------ convolutional models
#
# The paper (Sec. 3.1, "Network architectures") takes its classifiers from Jiang et al.
# (2018): small ConvNets for MNIST and SVHN, VGG-16 for CIFAR-10/100. The layer lists below
# follow the authors' public implementation (github.com/valeoai/ConfidNet,
# ``confidnet/models/``).

SAME_PADDING_MODE: Literal["reflect"] = "reflect"
"""Padding of the 'same' 3x3 convolutions. The authors pad with ``nn.ReflectionPad2d``
(their ``Conv2dSame``), not zeros; the paper only says 'same'. We follow the code. The
parameters are the same either way; on CUDA, reflection padding has no deterministic
backward kernel (a warning under ``torch.use_deterministic_algorithms(warn_only=True)``)."""


def _image_shape(model: str, input_shape: tuple[int, ...], min_size: int) -> tuple[int, int, int]:
    """``(channels, height, width)`` of ``input_shape``, or a ``ValueError`` saying why the
    conv/pool stack of ``model`` cannot take it."""
    if len(input_shape) != 3:
        raise ValueError(f"{model} needs (channels, height, width) inputs; got input shape "
                         f"{tuple(input_shape)}")
    channels, height, width = (int(s) for s in input_shape)
    if min(height, width) < min_size:
        raise ValueError(f"{model}: input shape {tuple(input_shape)} is too small for its "
                         f"conv/pool stack; height and width must be at least {min_size}")
    return channels, height, width


def _same_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    """A 3x3 'same' convolution (stride 1, one pixel of padding each side)."""
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, padding_mode=SAME_PADDING_MODE)


def _conv_relu_bn(index: int, in_channels: int,
                  out_channels: int) -> list[tuple[str, nn.Module]]:
    """``conv{i} -> relu{i} -> bn{i}``: the authors normalise *after* the ReLU."""
    return [(f"conv{index}", _same_conv(in_channels, out_channels)),
            (f"relu{index}", nn.ReLU()),
            (f"bn{index}", nn.BatchNorm2d(out_channels))]


def _embedding(in_features: int, hidden: int, dropout: float,
               input_dropout: float | None = None) -> nn.Sequential:
    """The penultimate layer: ``[dropout ->] fc -> ReLU -> dropout``. Its output is the
    features; the last dropout is part of them, so MC Dropout samples the layer ConfidNet
    reads and eval mode makes it the identity (as in the MLP)."""
    layers: list[tuple[str, nn.Module]] = []
    if input_dropout is not None:
        layers.append(("dropout_in", nn.Dropout(input_dropout)))
    layers += [("fc", nn.Linear(in_features, hidden)),
               ("relu", nn.ReLU()),
               ("dropout", nn.Dropout(dropout))]
    return nn.Sequential(OrderedDict(layers))


class ConvClassifier(Classifier):
    """``conv_stack`` (the convolutions, ending in a flatten) -> ``embedding`` (the
    penultimate ``feature_dim`` activations: the paper's features) -> ``fc_out`` (logits).

    ``conv_stack`` was called ``features`` until the conv stack and the paper's features
    were told apart by name; state_dict keys changed with it (``features.conv1.weight`` is
    now ``conv_stack.conv1.weight``), so weights saved before then do not load."""

    conv_stack: nn.Sequential
    embedding: nn.Sequential
    fc_out: nn.Linear
    flatten_dim: int

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding(self.conv_stack(x))

    @property
    def feature_dropout(self) -> nn.Dropout:
        dropout = self.embedding.dropout
        assert isinstance(dropout, nn.Dropout)
        return dropout

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc_out(features)


class SmallConvNetMNIST(ConvClassifier):
    """The paper's MNIST SmallConvNet (Sec. 3.1; authors' ``small_convnet_mnist.py``):
    conv3x3 32 -> ReLU -> conv3x3 64 -> ReLU -> maxpool 2 -> dropout 0.25 -> flatten
    (9,216 for 1x28x28) -> fc ``hidden`` (128) -> ReLU -> dropout ``dropout`` (0.5) -> fc.

    The convolutions are unpadded; no batch norm. The features are the ``hidden``-d
    activations after the last dropout.
    """

    CONV_DROPOUT: ClassVar[float] = 0.25

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 128,
                 dropout: float = 0.5) -> None:
        super().__init__()
        # two unpadded 3x3 convs take 4 pixels, the pool halves: at least 1 pixel left
        channels, height, width = _image_shape("smallconv_mnist", input_shape, min_size=6)
        self.flatten_dim = 64 * ((height - 4) // 2) * ((width - 4) // 2)
        self.feature_dim = hidden
        self.conv_stack = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(channels, 32, 3)),
            ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(32, 64, 3)),
            ("relu2", nn.ReLU()),
            ("pool", nn.MaxPool2d(2)),
            ("dropout", nn.Dropout(self.CONV_DROPOUT)),
            ("flatten", nn.Flatten()),
        ]))
        self.embedding = _embedding(self.flatten_dim, hidden, dropout)
        self.fc_out = nn.Linear(hidden, num_classes)


class SmallConvNetSVHN(ConvClassifier):
    """The paper's SVHN SmallConvNet (Sec. 3.1; authors' ``small_convnet_svhn.py``):
    three blocks ``[conv3x3 -> ReLU -> BN -> conv3x3 -> ReLU -> BN -> maxpool 2 ->
    dropout 0.3]`` of 32, 64 and 128 channels, flatten (2,048 for 3x32x32), fc ``hidden``
    (512) -> ReLU -> dropout ``dropout`` (0.3) -> fc.

    'Same' convolutions with reflection padding (``SAME_PADDING_MODE``, as the authors'
    code); BN after the ReLU, as theirs. The features are the ``hidden``-d activations
    after the last dropout.
    """

    CHANNELS: ClassVar[tuple[int, ...]] = (32, 64, 128)
    CONV_DROPOUT: ClassVar[float] = 0.3

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 512,
                 dropout: float = 0.3) -> None:
        super().__init__()
        pools = len(self.CHANNELS)
        # every block needs >= 2 pixels (reflection padding, then the pool)
        channels, height, width = _image_shape("smallconv_svhn", input_shape,
                                               min_size=2**pools)
        self.flatten_dim = self.CHANNELS[-1] * (height // 2**pools) * (width // 2**pools)
        self.feature_dim = hidden
        blocks: list[tuple[str, nn.Module]] = []
        size = channels
        for b, width_b in enumerate(self.CHANNELS, start=1):
            blocks.append((f"block{b}", nn.Sequential(OrderedDict([
                *_conv_relu_bn(2 * b - 1, size, width_b),
                *_conv_relu_bn(2 * b, width_b, width_b),
                ("pool", nn.MaxPool2d(2)),
                ("dropout", nn.Dropout(self.CONV_DROPOUT)),
            ]))))
            size = width_b
        blocks.append(("flatten", nn.Flatten()))
        self.conv_stack = nn.Sequential(OrderedDict(blocks))
        self.embedding = _embedding(self.flatten_dim, hidden, dropout)
        self.fc_out = nn.Linear(hidden, num_classes)


class VGG16(ConvClassifier):
    """The paper's VGG-16 for CIFAR-10/100 (Sec. 3.1; authors' ``vgg16.py``).

    Thirteen 'same' 3x3 convs in five blocks (64, 64 | 128, 128 | 256 x3 | 512 x3 |
    512 x3), each ``conv -> ReLU -> BN``; dropout 0.3 after conv1 and 0.4 after convs 3, 5,
    6, 8, 9, 11 and 12; maxpool 2 closing each block (after convs 2, 4, 7, 10, 13). Then
    flatten (512 for 3x32x32) -> dropout ``dropout`` (0.5) -> fc ``hidden`` (512) -> ReLU
    -> dropout ``dropout`` (0.5) -> fc. The features are the ``hidden``-d activations after
    the last dropout.

    Trained from scratch: the authors' ImageNet initialisation copied nothing
    (valeoai/ConfidNet), and ImageNet weights would not fit the BN-after-ReLU layout anyway. Padding
    is by reflection, as in their code (``SAME_PADDING_MODE``).
    """

    BLOCKS: ClassVar[tuple[tuple[int, ...], ...]] = (
        (64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
    # conv index (1-based) -> rate of the dropout that follows its BN
    CONV_DROPOUT: ClassVar[dict[int, float]] = {
        1: 0.3, 3: 0.4, 5: 0.4, 6: 0.4, 8: 0.4, 9: 0.4, 11: 0.4, 12: 0.4}

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: int = 512,
                 dropout: float = 0.5) -> None:
        super().__init__()
        pools = len(self.BLOCKS)
        channels, height, width = _image_shape("vgg16", input_shape, min_size=2**pools)
        self.flatten_dim = self.BLOCKS[-1][-1] * (height // 2**pools) * (width // 2**pools)
        self.feature_dim = hidden
        blocks: list[tuple[str, nn.Module]] = []
        size, conv = channels, 0
        for b, widths in enumerate(self.BLOCKS, start=1):
            layers: list[tuple[str, nn.Module]] = []
            for width_c in widths:
                conv += 1
                layers += _conv_relu_bn(conv, size, width_c)
                if conv in self.CONV_DROPOUT:
                    layers.append((f"dropout{conv}", nn.Dropout(self.CONV_DROPOUT[conv])))
                size = width_c
            layers.append(("pool", nn.MaxPool2d(2)))
            blocks.append((f"block{b}", nn.Sequential(OrderedDict(layers))))
        blocks.append(("flatten", nn.Flatten()))
        self.conv_stack = nn.Sequential(OrderedDict(blocks))
        self.embedding = _embedding(self.flatten_dim, hidden, dropout, input_dropout=dropout)
        self.fc_out = nn.Linear(hidden, num_classes)


@MODELS.register("smallconv_mnist")
def build_smallconv_mnist(input_shape: tuple[int, ...], num_classes: int,
                          cfg: dict[str, Any]) -> Classifier:
    return SmallConvNetMNIST(input_shape, num_classes, hidden=cfg["hidden"],
                             dropout=cfg["dropout"])


@MODELS.register("smallconv_svhn")
def build_smallconv_svhn(input_shape: tuple[int, ...], num_classes: int,
                         cfg: dict[str, Any]) -> Classifier:
    return SmallConvNetSVHN(input_shape, num_classes, hidden=cfg["hidden"],
                            dropout=cfg["dropout"])


@MODELS.register("vgg16")
def build_vgg16(input_shape: tuple[int, ...], num_classes: int,
                cfg: dict[str, Any]) -> Classifier:
    return VGG16(input_shape, num_classes, hidden=cfg["hidden"], dropout=cfg["dropout"])


class SegNet(Classifier):
    """SegNet (Badrinarayanan et al. 2017), as the authors' CamVid model (paper Sec. 3.1;
    valeoai/ConfidNet, ``segnet.py``): a VGG16-style encoder of conv3x3-BN-ReLU blocks
    (2x64, 2x128, 3x256, 3x512, 3x512), each closed by a 2x2 max-pool that records its
    indices, and a mirrored decoder that unpools with those indices to the recorded
    pre-pool sizes (360x480 is not a multiple of 32: odd sizes come back exactly), then
    the block's convolutions in reverse. Dropout ``dropout`` (0.5) after encoder blocks
    3-5 (Bayesian SegNet's central placement) and 0.5, 0.4, 0.3 after decoder blocks 5, 4,
    3. ``encode`` ends at the decoder's last 64-channel feature map, what the per-pixel
    ConfidNet reads (``feature_dim`` 64); ``classify`` is a 3x3 convolution to the class
    logits. Zero 'same' padding, as SegNet; trained from scratch."""

    per_pixel: ClassVar[bool] = True
    BLOCKS: ClassVar[tuple[tuple[int, ...], ...]] = (
        (64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
    DECODER_DROPOUT: ClassVar[tuple[float, ...]] = (0.5, 0.4, 0.3)
    FEATURES: ClassVar[int] = 64

    def __init__(self, input_shape: tuple[int, ...], num_classes: int,
                 dropout: float = 0.5) -> None:
        super().__init__()
        channels, _, _ = _image_shape("segnet", input_shape, min_size=2 ** len(self.BLOCKS))
        self.feature_dim = self.FEATURES
        self.encoder = nn.ModuleList()
        self.encoder_dropout = nn.ModuleList()
        size = channels
        for b, widths in enumerate(self.BLOCKS):
            layers = []
            for width in widths:
                layers += [nn.Conv2d(size, width, 3, padding=1), nn.BatchNorm2d(width),
                           nn.ReLU(inplace=True)]
                size = width
            self.encoder.append(nn.Sequential(*layers))
            self.encoder_dropout.append(nn.Dropout(dropout) if b >= 2 else nn.Identity())
        self.decoder = nn.ModuleList()
        self.decoder_dropout = nn.ModuleList()
        # decoder block i mirrors encoder block i: its convs keep the width, the last one
        # narrows to the width entering the encoder block (64 for the first block)
        for b in reversed(range(len(self.BLOCKS))):
            widths = self.BLOCKS[b]
            out = self.BLOCKS[b - 1][-1] if b > 0 else self.FEATURES
            layers = []
            for i, width in enumerate(widths):
                target = out if i == len(widths) - 1 else width
                layers += [nn.Conv2d(width, target, 3, padding=1), nn.BatchNorm2d(target),
                           nn.ReLU(inplace=True)]
            self.decoder.append(nn.Sequential(*layers))
            rank = len(self.BLOCKS) - 1 - b
            self.decoder_dropout.append(nn.Dropout(self.DECODER_DROPOUT[rank])
                                        if rank < len(self.DECODER_DROPOUT) else nn.Identity())
        self.fc_out = nn.Conv2d(self.FEATURES, num_classes, 3, padding=1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        trail = []
        for block, dropout in zip(self.encoder, self.encoder_dropout, strict=True):
            x = block(x)
            size = x.shape[-2:]
            x, indices = nn.functional.max_pool2d(x, 2, 2, return_indices=True)
            trail.append((indices, size))
            x = dropout(x)
        for block, dropout in zip(self.decoder, self.decoder_dropout, strict=True):
            indices, size = trail.pop()
            x = nn.functional.max_unpool2d(x, indices, (2, 2), (2, 2), output_size=list(size))
            x = dropout(block(x))
        return x

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc_out(features)


@MODELS.register("segnet")
def build_segnet(input_shape: tuple[int, ...], num_classes: int,
                 cfg: dict[str, Any]) -> Classifier:
    """``classifier.hidden`` must be 64 (the decoder's last width, SegNet's feature maps);
    ``classifier.dropout`` is the encoder's rate (the decoder's are fixed)."""
    if cfg["hidden"] != SegNet.FEATURES:
        raise ValueError(f"segnet: classifier.hidden = {cfg['hidden']}, but SegNet's feature "
                         f"maps have {SegNet.FEATURES} channels; set classifier.hidden: 64")
    return SegNet(input_shape, num_classes, dropout=cfg["dropout"])


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


class SegConfidNetHead(nn.Module):
    """ConfidNet for segmentation (authors' ``segnet_selfconfid``): fully convolutional,
    3x3 'same' convolutions ``in_channels`` -> 400 -> 120 -> 64 -> 64 -> 1 with ReLU
    between, over the decoder's last feature map; one confidence logit per pixel
    (``forward``: (N, H, W); the confidence is ``sigmoid(u)``)."""

    WIDTHS: ClassVar[tuple[int, ...]] = (400, 120, 64, 64)

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        size = in_channels
        for width in self.WIDTHS:
            layers += [nn.Conv2d(size, width, 3, padding=1), nn.ReLU(inplace=True)]
            size = width
        layers.append(nn.Conv2d(size, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(1)


def build_confidnet_head(classifier: Classifier, cfg: dict[str, Any]) -> nn.Module:
    """The ConfidNet head for ``classifier``: dense (``confidnet.width``, ``layers``) over
    its penultimate features, or the per-pixel convolutional head for a segmentation
    model (whose widths are fixed: ``width`` and ``layers`` do not apply)."""
    if classifier.per_pixel:
        return SegConfidNetHead(classifier.feature_dim)
    return ConfidNetHead(classifier.feature_dim, cfg["width"], cfg["layers"])


class ConfidNetModel(nn.Module):
    """Fine-tuning phase (paper Sec. 2.2, 'Learning scheme'): a *copy* of the classifier's
    encoder plus the ConfidNet head, trained end to end.

    The original classifier is not part of this module, so its predictions cannot move.
    The encoder copy always runs in eval mode: dropout off and batch-norm statistics
    frozen, as the paper prescribes; gradients still flow through it.
    """

    def __init__(self, classifier: Classifier, head: nn.Module) -> None:
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

