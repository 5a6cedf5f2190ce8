"""The paper's classification architectures (Sec. 3.1) as the authors implemented them:
MNIST MLP, MNIST and SVHN SmallConvNets, VGG-16 for CIFAR-10/100.

Parameter counts are recomputed here from the layer lists, independently of the code;
layer order is read from the order in which modules actually run (forward hooks).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from pipeline.models import (
    MLP,
    MODELS,
    VGG16,
    Classifier,
    ConfidNetHead,
    ConfidNetModel,
    SmallConvNetMNIST,
    SmallConvNetSVHN,
    build_classifier,
    enable_mc_dropout,
)

# ------------------------------------------------------------------------ helpers


def conv(k: int, cin: int, cout: int) -> int:
    return k * k * cin * cout + cout


def bn(c: int) -> int:
    return 2 * c  # weight and bias; running mean / var are buffers


def linear(n_in: int, n_out: int) -> int:
    return n_in * n_out + n_out


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def n_trainable(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def cfg(model: str, hidden: int, dropout: float) -> dict[str, Any]:
    # the classifier section of params.yaml, with keys the builders must ignore
    return {"model": model, "hidden": hidden, "dropout": dropout, "epochs": 1,
            "batch_size": 128, "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4}


def execution_order(model: nn.Module, x: torch.Tensor) -> list[nn.Module]:
    """The leaf modules in the order a forward pass runs them."""
    order: list[nn.Module] = []
    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(lambda mod, _i, _o: order.append(mod)) for m in leaves]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return order


# The settings of Table 1: (registry name, input shape, classes, hidden, fc dropout)
SETTINGS = {
    "mnist_mlp": ("mlp", (1, 28, 28), 10, 1000, 0.3),
    "mnist_smallconv": ("smallconv_mnist", (1, 28, 28), 10, 128, 0.5),
    "svhn_smallconv": ("smallconv_svhn", (3, 32, 32), 10, 512, 0.3),
    "cifar10_vgg16": ("vgg16", (3, 32, 32), 10, 512, 0.5),
    "cifar100_vgg16": ("vgg16", (3, 32, 32), 100, 512, 0.5),
}

VGG_WIDTHS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def expected_params(setting: str) -> int:
    _, (c, h, w), k, hidden, _ = SETTINGS[setting]
    if setting == "mnist_mlp":
        return linear(c * h * w, hidden) + linear(hidden, k)
    if setting == "mnist_smallconv":
        return (conv(3, c, 32)
                + conv(3, 32, 64)
                + linear(64 * 12 * 12, hidden)  # 28 -> 26 -> 24 -> pool 12
                + linear(hidden, k))
    if setting == "svhn_smallconv":
        total, cin = 0, c
        for width in (32, 64, 128):
            total += conv(3, cin, width) + bn(width) + conv(3, width, width) + bn(width)
            cin = width
        return total + linear(128 * 4 * 4, hidden) + linear(hidden, k)  # 32 -> 16 -> 8 -> 4
    # VGG-16: 32 -> 1 after five pools
    total, cin = 0, c
    for width in VGG_WIDTHS:
        total += conv(3, cin, width) + bn(width)
        cin = width
    return total + linear(512, hidden) + linear(hidden, k)


@pytest.fixture(scope="module")
def models() -> dict[str, Classifier]:
    torch.manual_seed(0)
    return {name: build_classifier(shape, k, cfg(model, hidden, p))
            for name, (model, shape, k, hidden, p) in SETTINGS.items()}


def batch(setting: str, size: int = 2) -> torch.Tensor:
    return torch.randn(size, *SETTINGS[setting][1], generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------ registry and parameters


def test_registry_names_and_classes(models: dict[str, Classifier]) -> None:
    assert MODELS.names() == ["mlp", "segnet", "smallconv_mnist", "smallconv_svhn", "vgg16"]
    assert isinstance(models["mnist_mlp"], MLP)
    assert isinstance(models["mnist_smallconv"], SmallConvNetMNIST)
    assert isinstance(models["svhn_smallconv"], SmallConvNetSVHN)
    assert isinstance(models["cifar10_vgg16"], VGG16)
    assert isinstance(models["cifar100_vgg16"], VGG16)


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_parameter_counts(models: dict[str, Classifier], setting: str) -> None:
    model = models[setting]
    assert n_params(model) == n_trainable(model) == expected_params(setting)


def test_parameter_counts_written_out() -> None:
    # the same numbers, as literals, so a change in the arithmetic above is noticed too
    assert expected_params("mnist_mlp") == 784 * 1000 + 1000 + 1000 * 10 + 10 == 795_010
    assert expected_params("mnist_smallconv") == 1_199_882
    assert expected_params("svhn_smallconv") == 1_342_122
    assert expected_params("cifar10_vgg16") == 14_990_922
    assert expected_params("cifar100_vgg16") == 15_037_092


@pytest.mark.parametrize("setting", ["svhn_smallconv", "cifar10_vgg16"])
def test_batch_norm_layers_have_running_statistics(models: dict[str, Classifier],
                                                   setting: str) -> None:
    bns = [m for m in models[setting].modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == (6 if setting == "svhn_smallconv" else 13)
    for m in bns:
        assert m.affine and m.track_running_stats
        assert m.running_mean is not None and m.running_var is not None
        assert m.running_mean.shape == m.running_var.shape == (m.num_features,)
    buffers = dict(models[setting].named_buffers())
    assert sum(name.endswith("running_mean") for name in buffers) == len(bns)
    assert sum(name.endswith("num_batches_tracked") for name in buffers) == len(bns)


def test_hidden_and_dropout_come_from_the_config() -> None:
    model = build_classifier((3, 32, 32), 10, cfg("vgg16", hidden=256, dropout=0.2))
    assert model.feature_dim == 256
    # the fc part of cifar10_vgg16 (512->512->10) replaced by 512->256->10
    fc_512 = linear(512, 512) + linear(512, 10)
    assert n_params(model) == expected_params("cifar10_vgg16") - fc_512 + (
        linear(512, 256) + linear(256, 10))
    fc_dropouts = [m.p for m in model.embedding.modules() if isinstance(m, nn.Dropout)]
    assert fc_dropouts == [0.2, 0.2]
    conv_dropouts = [m.p for m in model.conv_stack.modules() if isinstance(m, nn.Dropout)]
    assert conv_dropouts == [0.3] + [0.4] * 7  # fixed by the architecture

    mnist = build_classifier([1, 28, 28], 10, cfg("smallconv_mnist", hidden=64, dropout=0.1))
    assert mnist.feature_dim == 64
    assert [m.p for m in mnist.modules() if isinstance(m, nn.Dropout)] == [0.25, 0.1]
    svhn = build_classifier([3, 32, 32], 10, cfg("smallconv_svhn", hidden=100, dropout=0.2))
    assert [m.p for m in svhn.modules() if isinstance(m, nn.Dropout)] == [0.3, 0.3, 0.3, 0.2]


# -------------------------------------------------------------------------- shapes


@pytest.mark.parametrize(("setting", "features", "flatten"), [
    ("mnist_mlp", 1000, None),
    ("mnist_smallconv", 128, 9216),
    ("svhn_smallconv", 512, 2048),
    ("cifar10_vgg16", 512, 512),
    ("cifar100_vgg16", 512, 512),
])
def test_output_feature_and_flatten_shapes(models: dict[str, Classifier], setting: str,
                                           features: int, flatten: int | None) -> None:
    model = models[setting].eval()
    k = SETTINGS[setting][2]
    x = batch(setting, 3)
    with torch.no_grad():
        assert model(x).shape == (3, k)
        assert model.encode(x).shape == (3, features)
        if flatten is not None:
            assert model.flatten_dim == flatten
            assert model.conv_stack(x).shape == (3, flatten)
    assert model.feature_dim == features


@pytest.mark.parametrize(("model", "shape", "flatten"), [
    ("smallconv_mnist", (1, 28, 36), 64 * 12 * 16),
    ("smallconv_mnist", (1, 6, 6), 64),
    ("smallconv_svhn", (3, 40, 17), 128 * 5 * 2),
    ("smallconv_svhn", (1, 8, 8), 128),
    ("vgg16", (3, 64, 33), 512 * 2 * 1),
    ("vgg16", (1, 32, 32), 512),
])
def test_flatten_size_follows_the_input_shape(model: str, shape: tuple[int, ...],
                                              flatten: int) -> None:
    net = build_classifier(shape, 5, cfg(model, hidden=16, dropout=0.5)).eval()
    assert net.flatten_dim == flatten
    with torch.no_grad():
        assert net.conv_stack(torch.randn(2, *shape)).shape == (2, flatten)
        assert net(torch.randn(2, *shape)).shape == (2, 5)


@pytest.mark.parametrize(("model", "shape", "minimum"), [
    ("smallconv_mnist", (1, 5, 28), 6),
    ("smallconv_svhn", (3, 32, 7), 8),
    ("vgg16", (3, 16, 16), 32),
    ("vgg16", (3, 31, 64), 32),
])
def test_too_small_input_raises_a_helpful_error(model: str, shape: tuple[int, ...],
                                                minimum: int) -> None:
    with pytest.raises(ValueError, match=model) as error:
        build_classifier(shape, 10, cfg(model, hidden=16, dropout=0.5))
    message = str(error.value)
    assert str(shape) in message and f"at least {minimum}" in message


@pytest.mark.parametrize("model", ["smallconv_mnist", "smallconv_svhn", "vgg16"])
def test_non_image_input_shape_raises(model: str) -> None:
    with pytest.raises(ValueError, match=r"\(channels, height, width\)"):
        build_classifier((784,), 10, cfg(model, hidden=16, dropout=0.5))


# ------------------------------------------------------------------------ layer order


def test_smallconv_mnist_layer_order(models: dict[str, Classifier]) -> None:
    order = execution_order(models["mnist_smallconv"].eval(), batch("mnist_smallconv"))
    kinds = [type(m) for m in order]
    assert kinds == [nn.Conv2d, nn.ReLU, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Dropout,
                     nn.Flatten, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    convs = [m for m in order if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 32, (3, 3), (0, 0)), (32, 64, (3, 3), (0, 0))]
    assert [m.p for m in order if isinstance(m, nn.Dropout)] == [0.25, 0.5]


def test_smallconv_svhn_layer_order(models: dict[str, Classifier]) -> None:
    order = execution_order(models["svhn_smallconv"].eval(), batch("svhn_smallconv"))
    block = [nn.Conv2d, nn.ReLU, nn.BatchNorm2d, nn.Conv2d, nn.ReLU, nn.BatchNorm2d,
             nn.MaxPool2d, nn.Dropout]
    assert [type(m) for m in order] == 3 * block + [nn.Flatten, nn.Linear, nn.ReLU,
                                                    nn.Dropout, nn.Linear]
    convs = [m for m in order if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64, 128, 128]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    assert [m.p for m in order if isinstance(m, nn.Dropout)] == [0.3, 0.3, 0.3, 0.3]


def test_vgg16_layer_order(models: dict[str, Classifier]) -> None:
    order = execution_order(models["cifar10_vgg16"].eval(), batch("cifar10_vgg16"))
    convs = [m for m in order if isinstance(m, nn.Conv2d)]
    assert len(convs) == 13
    assert [c.out_channels for c in convs] == VGG_WIDTHS
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.stride == (1, 1)
               for c in convs)
    assert sum(isinstance(m, nn.MaxPool2d) for m in order) == 5
    assert sum(isinstance(m, nn.BatchNorm2d) for m in order) == 13

    # every conv is followed by ReLU then BN (BN after the ReLU), every BN preceded by a ReLU
    for i, m in enumerate(order):
        if isinstance(m, nn.Conv2d):
            assert isinstance(order[i + 1], nn.ReLU) and isinstance(order[i + 2], nn.BatchNorm2d)
        if isinstance(m, nn.BatchNorm2d):
            assert isinstance(order[i - 1], nn.ReLU)
            assert isinstance(order[i - 2], nn.Conv2d)
            assert m.num_features == order[i - 2].out_channels

    # what follows each conv's BN, up to the next conv (or the flatten)
    after: dict[int, list[str]] = {}
    n = 0
    for m in order:
        if isinstance(m, nn.Conv2d):
            n += 1
            after[n] = []
        elif isinstance(m, nn.Flatten):
            break
        elif isinstance(m, nn.Dropout):
            after[n].append(f"dropout{m.p}")
        elif isinstance(m, nn.MaxPool2d):
            assert m.kernel_size == 2
            after[n].append("pool")
    assert after == {1: ["dropout0.3"], 2: ["pool"], 3: ["dropout0.4"], 4: ["pool"],
                     5: ["dropout0.4"], 6: ["dropout0.4"], 7: ["pool"],
                     8: ["dropout0.4"], 9: ["dropout0.4"], 10: ["pool"],
                     11: ["dropout0.4"], 12: ["dropout0.4"], 13: ["pool"]}

    # the fully connected part: flatten, dropout, fc, ReLU, dropout, fc
    head = order[order.index(next(m for m in order if isinstance(m, nn.Flatten))):]
    assert [type(m) for m in head] == [nn.Flatten, nn.Dropout, nn.Linear, nn.ReLU,
                                       nn.Dropout, nn.Linear]
    assert [m.p for m in head if isinstance(m, nn.Dropout)] == [0.5, 0.5]
    assert [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)] == [
        (512, 512), (512, 10)]


def test_plain_dropout_layers_only(models: dict[str, Classifier]) -> None:
    for model in models.values():
        dropouts = [m for m in model.modules()
                    if isinstance(m, nn.modules.dropout._DropoutNd)]
        assert dropouts and all(type(m) is nn.Dropout for m in dropouts)


# ------------------------------------------------------ eval, MC Dropout, encode/classify


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_forward_is_classify_of_encode(models: dict[str, Classifier], setting: str) -> None:
    model = models[setting].eval()
    x = batch(setting)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.classify(model.encode(x)))


# cifar100_vgg16 differs from cifar10_vgg16 in the last layer only: skipped for speed
@pytest.mark.parametrize("setting", [s for s in SETTINGS if s != "cifar100_vgg16"])
def test_eval_is_deterministic_and_mc_dropout_samples(models: dict[str, Classifier],
                                                      setting: str) -> None:
    model = models[setting]
    x = batch(setting)
    bn_state = {k: v.clone() for k, v in model.state_dict().items()
                if "running" in k or "num_batches" in k}
    try:
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)
            torch.testing.assert_close(model.encode(x), model.encode(x), rtol=0, atol=0)

        torch.manual_seed(0)
        enable_mc_dropout(model)
        assert not model.training
        for m in model.modules():
            if isinstance(m, nn.Dropout):
                assert m.training
            elif isinstance(m, nn.BatchNorm2d):
                assert not m.training
        with torch.no_grad():
            assert not torch.allclose(model(x), model(x))
            assert not torch.allclose(model.encode(x), model.encode(x))
        for k, v in model.state_dict().items():
            if k in bn_state:
                torch.testing.assert_close(v, bn_state[k], rtol=0, atol=0)
    finally:
        model.eval()


def test_train_mode_updates_batch_norm_statistics() -> None:
    # the counterpart of the MC Dropout check: BN statistics do move in training
    model = build_classifier((3, 32, 32), 10, cfg("smallconv_svhn", hidden=32, dropout=0.3))
    bn1 = model.conv_stack.block1.bn1
    before = bn1.running_mean.clone()
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32) + 1.0)
    assert not torch.equal(before, bn1.running_mean)
    assert int(bn1.num_batches_tracked) == 1


def test_enable_mc_dropout_handles_dropout2d() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Dropout2d(0.5),
                        nn.Dropout(0.5))
    net.train()
    enable_mc_dropout(net)
    assert [m.training for m in net] == [False, False, True, True]


def test_confidnet_fine_tuning_copy_runs_on_a_conv_net() -> None:
    # the phase-2 model copies the encoder and keeps it in eval mode (BN frozen, no dropout)
    classifier = build_classifier((3, 32, 32), 10, cfg("smallconv_svhn", hidden=64,
                                                       dropout=0.5))
    model = ConfidNetModel(classifier, ConfidNetHead(classifier.feature_dim, width=16)).train()
    assert not model.encoder.training
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2,)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    out.sum().backward()
    assert model.encoder.conv_stack.block1.conv1.weight.grad is not None
