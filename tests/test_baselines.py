"""Unit tests for ``pipeline.baselines``: MCP, the TCP oracle, TrustScore against a
brute-force computation, and MC Dropout (stochastic, seeded, batched, mode-preserving)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.baselines import (
    SCORERS,
    ScoringContext,
    mc_dropout,
    mc_dropout_probabilities,
    negative_entropy,
    second_neighbour_distances,
    softmax,
)
from pipeline.models import MLP


def _context(logits: np.ndarray, labels: np.ndarray, **kwargs) -> ScoringContext:
    n = len(logits)
    defaults = {
        "features": np.zeros((n, 2)),
        "train_features": np.zeros((2, 2)),
        "train_labels": np.zeros(2, dtype=np.int64),
    }
    defaults.update(kwargs)
    return ScoringContext(logits=logits, labels=labels, **defaults)


def _np_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def test_registry_names() -> None:
    assert SCORERS.names() == ["mc_dropout", "mcp", "tcp_oracle", "trustscore"]


# ----------------------------------------------------------------------- MCP, TCP oracle


def test_mcp_hand_case() -> None:
    # logits [0, ln 3] -> softmax [1/4, 3/4] -> MCP 3/4; [ln 2, ln 2, 0] -> [2/5, 2/5, 1/5]
    logits = np.array([[0.0, np.log(3.0), -np.inf], [np.log(2), np.log(2), 0.0]])
    scores = SCORERS["mcp"](_context(logits, np.array([0, 2])))
    np.testing.assert_allclose(scores, [0.75, 0.4], rtol=1e-12)


def test_mcp_equals_max_softmax_random() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=3.0, size=(40, 7))
    scores = SCORERS["mcp"](_context(logits, rng.integers(0, 7, 40)))
    np.testing.assert_allclose(scores, _np_softmax(logits).max(axis=1), rtol=1e-12)
    assert scores.shape == (40,)


def test_tcp_oracle_equals_softmax_at_label() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=3.0, size=(40, 6))
    labels = rng.integers(0, 6, 40)
    scores = SCORERS["tcp_oracle"](_context(logits, labels))
    np.testing.assert_allclose(scores, _np_softmax(logits)[np.arange(40), labels], rtol=1e-12)
    # differs from MCP exactly where the prediction is wrong
    mcp = SCORERS["mcp"](_context(logits, labels))
    wrong = logits.argmax(1) != labels
    assert wrong.any() and (~wrong).any()
    np.testing.assert_allclose(scores[~wrong], mcp[~wrong], rtol=1e-12)
    assert np.all(scores[wrong] < mcp[wrong])


def test_softmax_is_float64_and_stable() -> None:
    probs = softmax(np.array([[1000.0, 0.0], [-1000.0, -1000.0]], dtype=np.float32))
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs, [[1.0, 0.0], [0.5, 0.5]])


# ---------------------------------------------------------------------------- TrustScore


def _brute_force_trust_score(train_x, train_y, queries, predicted, num_classes):
    dist = np.empty((len(queries), num_classes))
    for k in range(num_classes):
        members = train_x[train_y == k]
        d = np.sqrt(((queries[:, None, :] - members[None, :, :]) ** 2).sum(-1))
        dist[:, k] = np.sort(d, axis=1)[:, 1]  # 2nd nearest point of the class
    rows = np.arange(len(queries))
    to_pred = dist[rows, predicted]
    others = dist.copy()
    others[rows, predicted] = np.inf
    return others.min(axis=1) / (to_pred + 1e-12), dist


@pytest.mark.parametrize("seed", range(3))
def test_trustscore_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k, d = 4, 5
    centres = rng.normal(scale=3.0, size=(k, d))
    sizes = [6, 15, 9, 20]  # unequal classes
    train_y = np.concatenate([np.full(s, c) for c, s in enumerate(sizes)])
    train_x = centres[train_y] + rng.normal(size=(len(train_y), d))
    queries = np.r_[centres[rng.integers(0, k, 25)] + rng.normal(size=(25, d)),
                    train_x[:5]]  # some queries are training points (their own 1st NN)
    logits = rng.normal(size=(len(queries), k))
    labels = rng.integers(0, k, len(queries))
    ctx = _context(logits, labels, features=queries, train_features=train_x,
                   train_labels=train_y)
    expected, expected_dist = _brute_force_trust_score(
        train_x, train_y, queries, logits.argmax(1), k)
    dist = second_neighbour_distances(train_x, train_y, queries, k)
    np.testing.assert_allclose(dist, expected_dist, rtol=1e-4, atol=1e-4)
    scores = SCORERS["trustscore"](ctx)
    assert scores.shape == (len(queries),)
    np.testing.assert_allclose(scores, expected, rtol=1e-3)
    # uses the *predicted* class, not the label: some scores would differ with labels
    wrong_class, _ = _brute_force_trust_score(train_x, train_y, queries, labels, k)
    assert not np.allclose(scores, wrong_class, rtol=1e-3)


def test_trustscore_hand_case() -> None:
    # 1-D features. class 0 at 0, 1, 2; class 1 at 10, 11, 13.
    # query 0.5 predicted 0: 2nd NN in class 0 = 1 (dists .5, .5, 1.5 -> sorted .5, .5)
    #   -> d0 = 0.5; class 1: dists 9.5, 10.5, 12.5 -> d1 = 10.5; score = 10.5 / 0.5 = 21
    # query 12 predicted 0 (a likely error): d0 = dists 12, 11, 10 -> 11;
    #   d1 = dists 2, 1, 1 -> 1; score = 1 / 11
    train_x = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [13.0]])
    train_y = np.array([0, 0, 0, 1, 1, 1])
    queries = np.array([[0.5], [12.0]])
    logits = np.array([[1.0, 0.0], [1.0, 0.0]])
    ctx = _context(logits, np.array([0, 1]), features=queries, train_features=train_x,
                   train_labels=train_y)
    np.testing.assert_allclose(SCORERS["trustscore"](ctx), [21.0, 1 / 11], rtol=1e-5)


# ---------------------------------------------------------------------------- MC Dropout


def _mlp(dropout: float = 0.5, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP((12,), num_classes=3, hidden=32, dropout=dropout)


def _inputs(n: int = 25) -> torch.Tensor:
    return torch.randn(n, 12, generator=torch.Generator().manual_seed(42))


def test_mc_dropout_shape_and_valid_probabilities() -> None:
    probs = mc_dropout_probabilities(_mlp(), _inputs(), samples=8, batch_size=1000, seed=0)
    assert probs.shape == (8, 25, 3)
    assert torch.all(probs >= 0) and torch.all(probs <= 1)
    torch.testing.assert_close(probs.sum(-1), torch.ones(8, 25))


def test_mc_dropout_small_batches_split_into_many_chunks() -> None:
    # batch_size 16 with 8 samples: 2 inputs per forward pass -> 13 chunks for 25 inputs
    clf = _mlp()
    calls = []
    handle = clf.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        probs = mc_dropout_probabilities(clf, _inputs(), samples=8, batch_size=16, seed=0)
    finally:
        handle.remove()
    assert len(calls) == 13 and max(calls) <= 16
    assert probs.shape == (8, 25, 3)
    assert torch.all(probs >= 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(8, 25))
    # a batch smaller than the number of samples still makes progress (1 input a pass)
    tiny = mc_dropout_probabilities(clf, _inputs(5), samples=8, batch_size=3, seed=0)
    assert tiny.shape == (8, 5, 3)
    torch.testing.assert_close(tiny.sum(-1), torch.ones(8, 5))


def test_mc_dropout_is_stochastic() -> None:
    clf = _mlp()
    a = mc_dropout_probabilities(clf, _inputs(), samples=6, batch_size=1000, seed=0)
    b = mc_dropout_probabilities(clf, _inputs(), samples=6, batch_size=1000, seed=1)
    assert not torch.allclose(a, b)
    # the T samples differ from each other (a fresh mask per copy)
    for t in range(1, 6):
        assert not torch.allclose(a[0], a[t])
    # and from the deterministic pass
    clf.eval()
    with torch.no_grad():
        det = torch.softmax(clf(_inputs()), -1)
    assert not torch.allclose(a[0], det)


def test_mc_dropout_deterministic_for_same_seed_whatever_the_global_rng() -> None:
    clf = _mlp()
    torch.manual_seed(123)
    a = mc_dropout_probabilities(clf, _inputs(), samples=6, batch_size=20, seed=5)
    torch.manual_seed(999)
    b = mc_dropout_probabilities(clf, _inputs(), samples=6, batch_size=20, seed=5)
    assert torch.equal(a, b)


def test_mc_dropout_restores_global_rng_state() -> None:
    clf, x = _mlp(), _inputs()  # built first: _mlp seeds the global RNG itself
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    mc_dropout_probabilities(clf, x, samples=4, batch_size=100, seed=0)
    torch.testing.assert_close(torch.rand(3), expected)


def test_mc_dropout_with_p0_equals_eval_forward() -> None:
    clf = _mlp(dropout=0.0)
    probs = mc_dropout_probabilities(clf, _inputs(), samples=5, batch_size=15, seed=0)
    clf.eval()
    with torch.no_grad():
        det = torch.softmax(clf(_inputs()), -1)
    for t in range(5):
        torch.testing.assert_close(probs[t], det, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_mc_dropout_restores_mode(training: bool) -> None:
    clf = _mlp()
    clf.train(training)
    mc_dropout_probabilities(clf, _inputs(), samples=3, batch_size=100, seed=0)
    assert clf.training is training
    assert all(m.training is training for m in clf.modules())


def test_mc_dropout_restores_mode_after_an_error() -> None:
    clf = _mlp()
    clf.eval()
    with pytest.raises(RuntimeError):
        mc_dropout_probabilities(clf, torch.randn(4, 7), samples=3, batch_size=100, seed=0)
    assert not any(m.training for m in clf.modules())


def test_mc_dropout_scorer_is_negative_entropy_of_mean() -> None:
    clf = _mlp()
    x = _inputs(10)
    logits = np.random.default_rng(0).normal(size=(10, 3))
    ctx = _context(logits, np.zeros(10, dtype=np.int64), classifier=clf, inputs=x, seed=3,
                   params={"mc_samples": 7, "batch_size": 64})
    scores = mc_dropout(ctx)
    probs = mc_dropout_probabilities(clf, x, samples=7, batch_size=64, seed=3)
    mean = probs.mean(0).double().numpy()
    expected = np.sum(mean * np.log(mean), axis=1)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert scores.shape == (10,)
    assert np.all(scores <= 0) and np.all(scores >= -np.log(3) - 1e-9)
    # the scorer is deterministic for a seed
    np.testing.assert_array_equal(SCORERS["mc_dropout"](ctx), scores)


def test_mc_dropout_scorer_needs_classifier_and_inputs() -> None:
    ctx = _context(np.zeros((2, 3)), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="classifier"):
        mc_dropout(ctx)


def test_negative_entropy_hand_values() -> None:
    probs = np.array([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    np.testing.assert_allclose(negative_entropy(probs), [-np.log(3), 0.0, -np.log(2)],
                               atol=1e-10)
