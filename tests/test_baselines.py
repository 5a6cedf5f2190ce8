"""Unit tests for ``pipeline.baselines``: MCP, the TCP oracle, the logit-based scores
(entropy, max logit, energy, DOCTOR), temperature-scaled MCP, TrustScore against a
brute-force computation, and MC Dropout (stochastic, seeded, batched, mode-preserving;
entropy and mutual information from one set of passes)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pipeline.baselines import (
    CPU_PASS_BYTES,
    SCORERS,
    ScoringContext,
    fit_temperature,
    inputs_per_pass,
    largest_output_bytes,
    mc_dropout,
    mc_dropout_mutual_information,
    mc_dropout_probabilities,
    mcp_temperature,
    negative_entropy,
    second_neighbour_distances,
    softmax,
    temperature_nll,
)
from pipeline.methods import CHALLENGERS, METHOD_LABELS, ORACLES, ordered_methods
from pipeline.models import MLP, SmallConvNetMNIST


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
    assert SCORERS.names() == [
        "doctor", "energy", "entropy", "max_logit", "mc_dropout",
        "mc_dropout_mutual_information", "mcp", "mcp_temperature", "tcp_oracle", "trustscore",
    ]


def test_every_scorer_has_a_label_in_display_order() -> None:
    assert set(SCORERS.names()) | set(CHALLENGERS) == set(METHOD_LABELS)
    assert ordered_methods(list(METHOD_LABELS)[::-1]) == [
        "mcp", "mcp_temperature", "entropy", "max_logit", "energy", "doctor", "mc_dropout",
        "mc_dropout_mutual_information", "trustscore", "confidnet", "confidnet_finetuned",
        "tcp_oracle",
    ]
    assert ORACLES == ("tcp_oracle",)


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


# ------------------------------------------------- entropy, max logit, energy, DOCTOR


def test_entropy_hand_values() -> None:
    # uniform over 3 -> -ln 3; [0, ln 3] -> [1/4, 3/4]; one class dominating -> ~0
    logits = np.array([[0.0, 0.0, 0.0], [0.0, np.log(3.0), -np.inf], [1000.0, 0.0, 0.0]])
    expected = [-np.log(3.0), 0.25 * np.log(0.25) + 0.75 * np.log(0.75), 0.0]
    scores = SCORERS["entropy"](_context(logits, np.zeros(3, dtype=np.int64)))
    np.testing.assert_allclose(scores, expected, atol=1e-12)
    assert scores.dtype == np.float64


def test_entropy_random_matches_numpy() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=3.0, size=(30, 5)).astype(np.float32)
    p = _np_softmax(logits.astype(np.float64))
    scores = SCORERS["entropy"](_context(logits, rng.integers(0, 5, 30)))
    np.testing.assert_allclose(scores, np.sum(p * np.log(p), axis=1), rtol=1e-10)
    assert np.all(scores <= 0) and np.all(scores >= -np.log(5) - 1e-12)


def test_max_logit() -> None:
    logits = np.array([[1.5, -2.0, 0.5], [-3.0, -1.0, -7.0]], dtype=np.float32)
    scores = SCORERS["max_logit"](_context(logits, np.zeros(2, dtype=np.int64)))
    np.testing.assert_array_equal(scores, [1.5, -1.0])
    assert scores.dtype == np.float64


def test_energy_hand_values_and_stability() -> None:
    # logsumexp of [0, 0] = ln 2; of [0, ln 2, ln 3] = ln 6; huge logits do not overflow
    logits = np.array([[0.0, 0.0, -np.inf], [0.0, np.log(2.0), np.log(3.0)],
                       [1000.0, 1000.0, -1000.0]])
    scores = SCORERS["energy"](_context(logits, np.zeros(3, dtype=np.int64)))
    np.testing.assert_allclose(scores, [np.log(2.0), np.log(6.0), 1000.0 + np.log(2.0)],
                               rtol=1e-12)


def test_energy_is_shift_equivariant_and_above_max_logit() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(scale=2.0, size=(20, 4))
    labels = np.zeros(20, dtype=np.int64)
    energy = SCORERS["energy"](_context(logits, labels))
    np.testing.assert_allclose(SCORERS["energy"](_context(logits + 5.0, labels)), energy + 5.0)
    max_logit = SCORERS["max_logit"](_context(logits, labels))
    assert np.all(energy > max_logit) and np.all(energy <= max_logit + np.log(4) + 1e-12)


def test_doctor_hand_values() -> None:
    # [0, ln 3] -> p = [1/4, 3/4]: sum p^2 = 5/8, g = 3/8, D_alpha = (3/8) / (5/8) = 3/5.
    # uniform over 4: sum p^2 = 1/4, g = 3/4, D_alpha = 3 (the minimum confidence 1 - K).
    # one class dominating: g -> 0, D_alpha -> 0.
    logits = np.array([[0.0, np.log(3.0), -np.inf, -np.inf], [0.0, 0.0, 0.0, 0.0],
                       [1000.0, 0.0, 0.0, 0.0]])
    scores = SCORERS["doctor"](_context(logits, np.zeros(3, dtype=np.int64)))
    np.testing.assert_allclose(scores, [-0.6, -3.0, 0.0], atol=1e-12)


def test_doctor_is_monotone_in_squared_norm_of_softmax() -> None:
    rng = np.random.default_rng(4)
    logits = rng.normal(scale=3.0, size=(50, 6))
    scores = SCORERS["doctor"](_context(logits, rng.integers(0, 6, 50)))
    purity = np.sum(_np_softmax(logits) ** 2, axis=1)
    np.testing.assert_allclose(scores, 1.0 - 1.0 / purity, rtol=1e-10)
    np.testing.assert_array_equal(np.argsort(scores), np.argsort(purity))
    assert np.all(scores <= 0) and np.all(scores >= 1 - 6 - 1e-12)


# --------------------------------------------------------------- temperature-scaled MCP


def _calibrated(n: int, k: int, seed: int, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): calibrated by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=scale, size=(n, k))
    p = _np_softmax(logits)
    labels = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return logits, labels


def test_fit_temperature_recovers_overconfidence_and_lowers_nll() -> None:
    logits, labels = _calibrated(4000, 5, seed=0)
    overconfident = 3.0 * logits  # the true temperature is 3
    t = fit_temperature(overconfident, labels)
    assert 2.7 < t < 3.3, t
    nll_fitted = temperature_nll(overconfident, labels, t)
    assert nll_fitted < temperature_nll(overconfident, labels, 1.0) - 0.1
    # a minimum: nearby temperatures are no better
    for other in (0.9 * t, 1.1 * t):
        assert temperature_nll(overconfident, labels, other) >= nll_fitted
    # an underconfident classifier gets T < 1
    assert 0.4 < fit_temperature(0.5 * logits, labels) < 0.6


def test_fit_temperature_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="temperature"):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=np.int64))
    with pytest.raises(ValueError, match="temperature"):
        fit_temperature(np.zeros((4, 3)), np.zeros(3, dtype=np.int64))


def test_mcp_temperature_uses_the_validation_fit() -> None:
    val_logits, val_labels = _calibrated(2000, 4, seed=1)
    val_logits = 2.5 * val_logits
    logits, labels = _calibrated(30, 4, seed=2)
    ctx = _context(logits, labels, val_logits=val_logits, val_labels=val_labels)
    t = fit_temperature(val_logits, val_labels)
    scores = mcp_temperature(ctx)
    np.testing.assert_allclose(scores, _np_softmax(logits / t).max(axis=1), rtol=1e-10)
    # fitted on the validation split: the scored split's labels play no part
    shuffled = _context(logits, labels[::-1].copy(), val_logits=val_logits,
                        val_labels=val_labels)
    np.testing.assert_array_equal(SCORERS["mcp_temperature"](shuffled), scores)
    # T > 1 here: less confident than MCP, same predictions
    assert t > 1 and np.all(scores < SCORERS["mcp"](ctx))
    assert np.array_equal(_np_softmax(logits / t).argmax(1), logits.argmax(1))


def test_mcp_temperature_needs_validation_logits() -> None:
    ctx = _context(np.zeros((2, 3)), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="validation"):
        mcp_temperature(ctx)
    ctx = _context(np.zeros((2, 3)), np.zeros(2, dtype=np.int64), val_logits=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="val_labels"):
        mcp_temperature(ctx)


@pytest.mark.parametrize("val_scale", [0.5, 3.0])  # fitted T < 1 and T > 1
def test_mcp_temperature_keeps_mcp_auroc_for_two_classes(val_scale: float) -> None:
    # K = 2: MCP = sigmoid(|z_1 - z_2| / T), a strictly increasing function of the margin
    # for any T > 0, so the ranking, hence the AUROC, is exactly MCP's. (Logits moderate
    # enough that no score saturates to 1.0 in float64, which would create ties.)
    val_logits, val_labels = _calibrated(1000, 2, seed=5)
    logits, labels = _calibrated(300, 2, seed=6)
    correct = (logits.argmax(1) == labels).astype(int)
    ctx = _context(logits, labels, val_logits=val_scale * val_logits, val_labels=val_labels)
    scaled = mcp_temperature(ctx)
    mcp = SCORERS["mcp"](ctx)
    assert not np.allclose(scaled, mcp)
    np.testing.assert_array_equal(np.argsort(scaled, kind="stable"),
                                  np.argsort(mcp, kind="stable"))
    assert roc_auc_score(correct, scaled) == roc_auc_score(correct, mcp)


def test_mcp_temperature_can_change_the_ranking_for_three_classes() -> None:
    # K > 2: MCP = 1 / (1 + sum_{j != top} exp(-gap_j / T)) depends on every gap to the
    # top logit, and T weighs them differently, so temperature scaling is NOT
    # rank-preserving across samples and can change MCP's AUROC. Here a has gaps (1, 1)
    # and b gaps (0.6, 50): a is the more confident iff 2 exp(-1/T) < exp(-0.6/T), i.e.
    # T < 0.4 / ln 2 ~ 0.577. With a correct and b wrong, AUROC goes from 0 to 1.
    # (On random 10-class logits the change is typically ~1e-2 or less, not 0.)
    val_logits, val_labels = _calibrated(2000, 3, seed=7)
    logits = np.array([[0.0, -1.0, -1.0], [0.0, -0.6, -50.0]])
    labels = np.array([0, 1])  # a correct, b wrong
    ctx = _context(logits, labels, val_logits=0.3 * val_logits, val_labels=val_labels)
    assert fit_temperature(ctx.val_logits, ctx.val_labels) < 0.5
    mcp, scaled = SCORERS["mcp"](ctx), mcp_temperature(ctx)
    assert mcp[0] < mcp[1] and scaled[0] > scaled[1]
    correct = np.array([1, 0])
    assert roc_auc_score(correct, mcp) == 0.0 and roc_auc_score(correct, scaled) == 1.0


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
    probe, *passes = calls  # the first: one row, to size the passes (inputs_per_pass)
    assert probe == 1 and len(passes) == 13 and max(passes) <= 16
    assert probs.shape == (8, 25, 3)
    assert torch.all(probs >= 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(8, 25))
    # a batch smaller than the number of samples still makes progress (1 input a pass)
    tiny = mc_dropout_probabilities(clf, _inputs(5), samples=8, batch_size=3, seed=0)
    assert tiny.shape == (8, 5, 3)
    torch.testing.assert_close(tiny.sum(-1), torch.ones(8, 5))


# SmallConvNet's largest layer output for one 1x28x28 image: conv2's 64 x 24 x 24 floats
SMALLCONV_ROW_BYTES = 64 * 24 * 24 * 4


def test_largest_output_bytes_of_one_row() -> None:
    conv = SmallConvNetMNIST((1, 28, 28), 10).train()
    assert largest_output_bytes(conv, torch.zeros(3, 1, 28, 28)) == SMALLCONV_ROW_BYTES
    assert conv.training  # the probe runs in eval mode and gives the mode back
    assert largest_output_bytes(_mlp(), _inputs()) == 32 * 4  # the hidden layer


def test_mc_dropout_passes_on_a_cpu_stay_under_the_activation_budget() -> None:
    """4,096 rows of SmallConvNet's activations would outgrow a CPU's caches; on a CPU the
    pass holds as many inputs as CPU_PASS_BYTES allows, on a GPU as many as batch_size."""
    conv, images = SmallConvNetMNIST((1, 28, 28), 10), torch.zeros(10, 1, 28, 28)
    per_pass = inputs_per_pass(conv, images, samples=50, batch_size=4096, device="cpu")
    assert per_pass == CPU_PASS_BYTES // SMALLCONV_ROW_BYTES // 50 < 4096 // 50
    assert inputs_per_pass(conv, images, 50, 4096, device="cuda") == 4096 // 50
    assert inputs_per_pass(_mlp(), _inputs(), 50, 4096, device="cpu") == 4096 // 50
    # the same passes as asking for that many rows
    torch.manual_seed(0)
    small = SmallConvNetMNIST((1, 28, 28), 10)
    budgeted = mc_dropout_probabilities(small, images, samples=50, batch_size=4096, seed=3)
    asked = mc_dropout_probabilities(small, images, samples=50, batch_size=50 * per_pass,
                                     seed=3)
    assert torch.equal(budgeted, asked)


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


def _mc_context(clf: MLP, x: torch.Tensor, samples: int = 7, seed: int = 3) -> ScoringContext:
    logits = np.random.default_rng(0).normal(size=(len(x), 3))
    return _context(logits, np.zeros(len(x), dtype=np.int64), classifier=clf, inputs=x,
                    seed=seed, params={"mc_samples": samples, "batch_size": 64})


def test_mc_dropout_mutual_information_matches_bald() -> None:
    clf, x = _mlp(), _inputs(10)
    ctx = _mc_context(clf, x)
    scores = mc_dropout_mutual_information(ctx)
    probs = mc_dropout_probabilities(clf, x, samples=7, batch_size=64, seed=3).double().numpy()
    mean = probs.mean(0)
    entropy_of_mean = -np.sum(mean * np.log(mean), axis=1)
    mean_entropy = -np.sum(probs * np.log(probs), axis=2).mean(0)
    np.testing.assert_allclose(scores, -(entropy_of_mean - mean_entropy), rtol=1e-9)
    assert scores.shape == (10,)
    assert np.all(scores <= 1e-12) and np.any(scores < -1e-4)  # MI >= 0 (Jensen)
    # deterministic for a seed, also on a fresh context
    np.testing.assert_array_equal(SCORERS["mc_dropout_mutual_information"](_mc_context(clf, x)),
                                  scores)


def test_mc_dropout_mutual_information_hand_case() -> None:
    # two passes that disagree completely: H(mean) = ln 2, mean H = 0 -> MI = ln 2;
    # two passes that agree on [1/2, 1/2]: MI = 0, though the mean's entropy is ln 2 too.
    ctx = _context(np.zeros((2, 2)), np.zeros(2, dtype=np.int64))
    ctx.mc_dropout_samples = torch.tensor([[[1.0, 0.0], [0.5, 0.5]],
                                           [[0.0, 1.0], [0.5, 0.5]]])
    np.testing.assert_allclose(mc_dropout_mutual_information(ctx), [-np.log(2), 0.0],
                               atol=1e-12)
    np.testing.assert_allclose(mc_dropout(ctx), [-np.log(2), -np.log(2)], atol=1e-12)


def test_mc_dropout_mutual_information_is_zero_without_dropout() -> None:
    scores = mc_dropout_mutual_information(_mc_context(_mlp(dropout=0.0), _inputs(10)))
    np.testing.assert_allclose(scores, 0.0, atol=1e-6)


def test_mc_dropout_scorers_share_one_set_of_passes() -> None:
    clf, x = _mlp(), _inputs(10)
    ctx = _mc_context(clf, x)  # 7 samples x 10 inputs, 64 rows a pass -> 2 forward calls
    calls = []
    handle = clf.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        entropy_scores = SCORERS["mc_dropout"](ctx)
        mi_scores = SCORERS["mc_dropout_mutual_information"](ctx)
        SCORERS["mc_dropout"](ctx)
    finally:
        handle.remove()
    probe, *passes = calls  # one row, to size the passes (inputs_per_pass)
    assert probe == 1 and sum(passes) == 7 * 10, calls  # each input: 7 passes, once
    # the same passes whichever scorer runs first
    fresh = _mc_context(clf, x)
    np.testing.assert_array_equal(SCORERS["mc_dropout_mutual_information"](fresh), mi_scores)
    np.testing.assert_array_equal(SCORERS["mc_dropout"](fresh), entropy_scores)


def test_mc_dropout_mutual_information_needs_classifier_and_inputs() -> None:
    ctx = _context(np.zeros((2, 3)), np.zeros(2, dtype=np.int64))
    with pytest.raises(ValueError, match="classifier"):
        mc_dropout_mutual_information(ctx)


def test_negative_entropy_hand_values() -> None:
    probs = np.array([[1 / 3, 1 / 3, 1 / 3], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    np.testing.assert_allclose(negative_entropy(probs), [-np.log(3), 0.0, -np.log(2)],
                               atol=1e-10)
