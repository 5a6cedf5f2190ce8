"""Unit tests for ``pipeline.models``: the paper's MLP, the ConfidNet head and the
fine-tuning model with its frozen-mode encoder copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pipeline.models import (
    MLP,
    MODELS,
    ConfidNetHead,
    ConfidNetModel,
    build_classifier,
    enable_mc_dropout,
)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------ MLP


def test_paper_mnist_mlp_shapes_and_parameter_count() -> None:
    model = MLP((1, 28, 28), num_classes=10, hidden=1000, dropout=0.3)
    assert n_params(model) == 784 * 1000 + 1000 + 1000 * 10 + 10  # 795,010
    assert model.feature_dim == 1000
    x = torch.randn(3, 1, 28, 28)
    model.eval()
    assert model.encode(x).shape == (3, 1000)
    assert model(x).shape == (3, 10)
    # flattening: (784,) inputs give the same network
    assert n_params(MLP((784,), 10, 1000, 0.3)) == 795_010


def test_digits_mlp_via_registry() -> None:
    cfg = {"model": "mlp", "hidden": 1000, "dropout": 0.3}
    model = build_classifier([1, 8, 8], 10, cfg)  # a list, as read back from JSON
    assert isinstance(model, MLP)
    assert n_params(model) == 64 * 1000 + 1000 + 1000 * 10 + 10  # 75,010
    model.eval()
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    assert "mlp" in MODELS.names()


def test_mlp_forward_is_classify_of_encode_and_dropout_only_in_train() -> None:
    torch.manual_seed(0)
    model = MLP((16,), num_classes=4, hidden=64, dropout=0.5)
    x = torch.randn(8, 16)
    model.eval()
    torch.testing.assert_close(model(x), model.classify(model.encode(x)))
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))  # dropout is active in training


def test_enable_mc_dropout() -> None:
    model = MLP((16,), 4, 8, dropout=0.3)
    model.train()
    enable_mc_dropout(model)
    assert not model.training and model.dropout.training
    bn = nn.Sequential(nn.BatchNorm1d(4), nn.Dropout(0.2))
    enable_mc_dropout(bn)
    assert not bn[0].training and bn[1].training


# ---------------------------------------------------------------------- ConfidNet head


def test_confidnet_head_architecture() -> None:
    head = ConfidNetHead(1000)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (1000, 400), (400, 400), (400, 400), (400, 400), (400, 1)]
    assert sum(isinstance(m, nn.ReLU) for m in head.modules()) == 4
    assert n_params(head) == (1000 * 400 + 400) + 3 * (400 * 400 + 400) + (400 + 1)


@pytest.mark.parametrize("n", [1, 7])
def test_confidnet_head_returns_one_logit_per_sample(n: int) -> None:
    head = ConfidNetHead(32, width=16, layers=2)
    out = head(torch.randn(n, 32))
    assert out.shape == (n,)
    assert len([m for m in head.modules() if isinstance(m, nn.Linear)]) == 3


# ---------------------------------------------------------------------- ConfidNetModel


def _pair(seed: int = 0) -> tuple[MLP, ConfidNetModel]:
    torch.manual_seed(seed)
    classifier = MLP((1, 8, 8), num_classes=10, hidden=64, dropout=0.5)
    head = ConfidNetHead(classifier.feature_dim, width=32, layers=4)
    return classifier, ConfidNetModel(classifier, head)


def test_confidnet_model_encoder_stays_in_eval_after_train() -> None:
    _, model = _pair()
    model.train()
    assert model.training and model.head.training
    assert not model.encoder.training
    assert not any(m.training for m in model.encoder.modules())
    x = torch.randn(6, 1, 8, 8)
    first, second = model(x), model(x)
    assert first.shape == (6,)
    assert torch.equal(first, second)  # dropout of the encoder copy is off
    model.eval()
    assert not model.training and not model.head.training
    model.train(True)
    assert not model.encoder.training


def test_confidnet_model_encoder_in_eval_right_after_construction() -> None:
    classifier, model = _pair()
    assert classifier.training  # a freshly built module is in training mode
    x = torch.randn(6, 1, 8, 8)
    assert not model.encoder.training
    assert torch.equal(model(x), model(x))


def test_confidnet_model_encoder_is_a_copy() -> None:
    classifier, model = _pair()
    classifier.eval()
    x = torch.randn(16, 1, 8, 8)
    with torch.no_grad():
        before = classifier(x).clone()
    before_state = {k: v.clone() for k, v in classifier.state_dict().items()}
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    # no parameter tensor is shared
    ids = {p.data_ptr() for p in classifier.parameters()}
    assert not ids & {p.data_ptr() for p in model.parameters()}

    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    target = torch.rand(16)
    for _ in range(3):
        model.train()
        loss = nn.functional.mse_loss(torch.sigmoid(model(x)), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    # the encoder copy did learn ...
    changed = [k for k, v in model.encoder.state_dict().items()
               if not torch.equal(v, encoder_before[k])]
    assert "fc1.weight" in changed
    # ... the original classifier did not move, bit for bit
    for key, value in classifier.state_dict().items():
        assert torch.equal(value, before_state[key]), key
    with torch.no_grad():
        assert torch.equal(classifier(x), before)
    assert all(p.grad is None for p in classifier.parameters())


def test_confidnet_model_reads_encoder_features() -> None:
    classifier, model = _pair()
    model.eval()
    classifier.eval()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.head(classifier.encode(x)))
