"""Unit tests for ``pipeline.losses`` (criteria TCP / TCP^r and the ConfidNet losses) and
for the ``Registry`` that makes them selectable."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.losses import (
    CRITERIA,
    LOSSES,
    bce_loss,
    focal_loss,
    mse_loss,
    normalised_true_class_probability,
    ranking_loss,
    true_class_probability,
)
from pipeline.registry import Registry

FAST = settings(max_examples=150, deadline=None, database=None)

# Hand case shared by the criteria tests:
#   probs  = [[0.7, 0.2, 0.1],   label 0 -> correct (argmax 0): TCP 0.7, MCP 0.7, TCP^r 1
#             [0.3, 0.5, 0.2],   label 0 -> wrong   (argmax 1): TCP 0.3, MCP 0.5, TCP^r 0.6
#             [0.1, 0.1, 0.8]]   label 1 -> wrong   (argmax 2): TCP 0.1, MCP 0.8, TCP^r 0.125
PROBS = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.5, 0.2], [0.1, 0.1, 0.8]], dtype=torch.float64)
LABELS = torch.tensor([0, 0, 1])


# ------------------------------------------------------------------------------ criteria


def test_registry_names() -> None:
    assert CRITERIA.names() == ["tcp", "tcp_r"]
    assert LOSSES.names() == ["bce", "focal", "mse", "ranking"]
    assert CRITERIA["tcp"] is true_class_probability
    assert CRITERIA["tcp_r"] is normalised_true_class_probability
    assert LOSSES["mse"] is mse_loss and LOSSES["bce"] is bce_loss
    assert LOSSES["focal"] is focal_loss and LOSSES["ranking"] is ranking_loss


def test_tcp_hand_case() -> None:
    torch.testing.assert_close(true_class_probability(PROBS, LABELS),
                               torch.tensor([0.7, 0.3, 0.1], dtype=torch.float64))


def test_tcp_r_hand_case() -> None:
    torch.testing.assert_close(normalised_true_class_probability(PROBS, LABELS),
                               torch.tensor([1.0, 0.6, 0.125], dtype=torch.float64))


def test_tcp_differs_from_mcp_on_errors() -> None:
    mcp = PROBS.max(dim=-1).values
    tcp = true_class_probability(PROBS, LABELS)
    assert tcp[0] == mcp[0]
    assert torch.all(tcp[1:] < mcp[1:])


logits_and_label = st.integers(min_value=2, max_value=12).flatmap(
    lambda k: st.tuples(
        st.lists(st.floats(-15, 15, allow_nan=False), min_size=k, max_size=k),
        st.integers(0, k - 1),
    )
)


@FAST
@given(logits_and_label)
def test_tcp_bounds_from_paper_section_2_1(case: tuple[list[float], int]) -> None:
    """TCP > 1/2 => the prediction is right; TCP < 1/K => the prediction is wrong.

    A 1e-9 margin keeps float rounding of an exactly uniform softmax (TCP = 1/K up to the
    last bit) from counting as 'below 1/K'."""
    values, label = case
    k = len(values)
    probs = torch.softmax(torch.tensor([values], dtype=torch.float64), dim=-1)
    tcp = float(true_class_probability(probs, torch.tensor([label]))[0])
    predicted = int(probs.argmax(dim=-1)[0])
    if tcp > 0.5 + 1e-9:
        assert predicted == label
    if tcp < 1 / k - 1e-9:
        assert predicted != label
    # the bounds are tight where they say nothing: in between, both outcomes occur
    assert 0.0 <= tcp <= 1.0


def test_tcp_bounds_are_not_vacuous() -> None:
    """Between 1/K and 1/2 both outcomes occur (what makes TCP a criterion to learn)."""
    # K = 3, TCP 0.4 correct: [0.4, 0.35, 0.25]; TCP 0.4 wrong: [0.4, 0.45, 0.15] label 0
    probs = torch.tensor([[0.4, 0.35, 0.25], [0.4, 0.45, 0.15]], dtype=torch.float64)
    tcp = true_class_probability(probs, torch.tensor([0, 0]))
    torch.testing.assert_close(tcp, torch.tensor([0.4, 0.4], dtype=torch.float64))
    assert probs.argmax(-1).tolist() == [0, 1]


@FAST
@given(logits_and_label)
def test_tcp_r_is_one_for_correct_and_below_one_for_errors(case) -> None:
    values, label = case
    logits = torch.tensor([values], dtype=torch.float64)
    probs = torch.softmax(logits, dim=-1)
    top = probs.max(dim=-1).values
    assume(int((probs == top).sum()) == 1)  # a unique argmax: correctness is unambiguous
    tcp_r = float(normalised_true_class_probability(probs, torch.tensor([label]))[0])
    if int(probs.argmax(-1)[0]) == label:
        assert tcp_r == 1.0  # exactly
    else:
        assert tcp_r < 1.0


def test_criteria_batched_shapes_float32() -> None:
    probs = torch.softmax(torch.randn(7, 5, generator=torch.Generator().manual_seed(0)), -1)
    labels = torch.arange(7) % 5
    for name in CRITERIA:
        out = CRITERIA[name](probs, labels)
        assert out.shape == (7,) and out.dtype == torch.float32


# -------------------------------------------------------------------------------- losses
# Hand case for the losses:
#   logit u = [0, ln 3]  -> c = sigmoid(u) = [0.5, 0.75]
#   target  = [0.7, 0.3] (criterion values), correct = [1, 0]
LOGIT = torch.tensor([0.0, math.log(3.0)])
TARGET = torch.tensor([0.7, 0.3])
CORRECT = torch.tensor([1, 0])


def test_mse_hand_case() -> None:
    # ((0.5 - 0.7)^2 + (0.75 - 0.3)^2) / 2 = (0.04 + 0.2025) / 2 = 0.12125
    assert float(mse_loss(LOGIT, TARGET, CORRECT)) == pytest.approx(0.12125, abs=1e-6)


def test_bce_hand_case_reads_correctness_not_target() -> None:
    # -ln(0.5) for the correct one, -ln(1 - 0.75) = ln 4 for the wrong one: mean 1.5 ln 2
    expected = 1.5 * math.log(2)
    assert float(bce_loss(LOGIT, TARGET, CORRECT)) == pytest.approx(expected, abs=1e-6)
    # changing the criterion target does not change BCE
    assert float(bce_loss(LOGIT, torch.tensor([0.0, 1.0]), CORRECT)) == pytest.approx(
        expected, abs=1e-6)


def test_focal_hand_case() -> None:
    # alpha 0.25, gamma 2:
    #   correct (y=1): p_t = 0.5,  alpha_t = 0.25, (1-0.5)^2  * ln 2 * 0.25 = 0.0625 ln 2
    #   wrong   (y=0): p_t = 0.25, alpha_t = 0.75, (1-0.25)^2 * ln 4 * 0.75 = 0.421875 ln 4
    #   mean = (0.0625 ln 2 + 0.421875 ln 4) / 2 ~ 0.314082
    expected = (0.0625 * math.log(2) + 0.421875 * math.log(4)) / 2
    value = focal_loss(LOGIT, TARGET, CORRECT, focal_alpha=0.25, focal_gamma=2.0)
    assert float(value) == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.314082, abs=1e-6)


def test_focal_defaults_are_authors() -> None:
    # alpha 0.25, gamma 5 when not given
    expected = (0.25 * 0.5**5 * math.log(2) + 0.75 * 0.75**5 * math.log(4)) / 2
    assert float(focal_loss(LOGIT, TARGET, CORRECT)) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_focal_gamma0_alpha_half_is_half_bce(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logit = torch.randn(50, generator=gen) * 3
    correct = (torch.rand(50, generator=gen) < 0.7).long()
    target = torch.rand(50, generator=gen)
    focal = focal_loss(logit, target, correct, focal_alpha=0.5, focal_gamma=0.0)
    bce = bce_loss(logit, target, correct)
    torch.testing.assert_close(focal, 0.5 * bce)


def test_focal_down_weights_easy_examples() -> None:
    """With gamma > 0 a confidently right example costs (relatively) much less than BCE."""
    easy = torch.tensor([6.0])
    hard = torch.tensor([-1.0])
    one = torch.tensor([1])
    ratio_easy = focal_loss(easy, one, one, focal_alpha=0.5, focal_gamma=2.0) / bce_loss(
        easy, one, one)
    ratio_hard = focal_loss(hard, one, one, focal_alpha=0.5, focal_gamma=2.0) / bce_loss(
        hard, one, one)
    assert ratio_easy < 0.01 < ratio_hard


def test_ranking_hand_case() -> None:
    # u = [2, 0, 1], target = [0.9, 0.1, 0.5]; ordered pairs (i, j) with t_i > t_j:
    #   (0,1): u0-u1 = 2, (0,2): 1, (2,1): 1
    #   loss = [ln(1+e^-2) + 2 ln(1+e^-1)] / 3 = (0.126928 + 2 * 0.313262) / 3 ~ 0.251151
    u = torch.tensor([2.0, 0.0, 1.0])
    t = torch.tensor([0.9, 0.1, 0.5])
    expected = (math.log1p(math.exp(-2)) + 2 * math.log1p(math.exp(-1))) / 3
    assert expected == pytest.approx(0.251151, abs=1e-6)
    assert float(ranking_loss(u, t, torch.zeros(3))) == pytest.approx(expected, abs=1e-6)
    # the wrong order: u = [0, 2, 1] -> [ln(1+e^2) + 2 ln(1+e)] / 3 ~ 1.584484
    wrong = torch.tensor([0.0, 2.0, 1.0])
    expected_wrong = (math.log1p(math.exp(2)) + 2 * math.log1p(math.exp(1))) / 3
    assert float(ranking_loss(wrong, t, torch.zeros(3))) == pytest.approx(
        expected_wrong, abs=1e-6)


def test_ranking_ignores_pairs_with_equal_targets() -> None:
    # t = [0.5, 0.5, 0.1]: only (0,2) and (1,2) count; u0 vs u1 is free
    t = torch.tensor([0.5, 0.5, 0.1])
    a = ranking_loss(torch.tensor([1.0, 3.0, 0.0]), t, torch.zeros(3))
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(-3))) / 2
    assert float(a) == pytest.approx(expected, abs=1e-6)


def test_ranking_zero_but_differentiable_when_targets_equal() -> None:
    logit = torch.tensor([0.3, -1.0, 2.0], requires_grad=True)
    loss = ranking_loss(logit, torch.full((3,), 0.4), torch.ones(3))
    assert float(loss.detach()) == 0.0
    assert loss.requires_grad
    loss.backward()
    assert logit.grad is not None
    torch.testing.assert_close(logit.grad, torch.zeros(3))


def test_ranking_decreases_when_ordering_is_right() -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(20, generator=gen)
    right = target * 4  # same order as the targets
    reversed_ = -target * 4
    random_ = torch.randn(20, generator=gen)
    zeros = torch.zeros(20)
    loss_right = ranking_loss(right, target, zeros)
    loss_random = ranking_loss(random_, target, zeros)
    loss_reversed = ranking_loss(reversed_, target, zeros)
    assert loss_right < loss_random < loss_reversed
    # more separation in the right order lowers it further
    assert ranking_loss(right * 5, target, zeros) < loss_right


def _direct(name: str, logit, target, correct, alpha=0.25, gamma=5.0) -> torch.Tensor:
    """Each loss written out from its formula, elementwise, without torch.nn.functional."""
    c = 1 / (1 + torch.exp(-logit))
    y = correct.float()
    if name == "mse":
        return ((c - target) ** 2).mean()
    bce = -(y * torch.log(c) + (1 - y) * torch.log(1 - c))
    if name == "bce":
        return bce.mean()
    if name == "focal":
        p_t = y * c + (1 - y) * (1 - c)
        alpha_t = alpha * y + (1 - alpha) * (1 - y)
        return (alpha_t * (1 - p_t) ** gamma * bce).mean()
    total, count = 0.0, 0
    for i in range(len(logit)):
        for j in range(len(logit)):
            if target[i] > target[j]:
                total = total + torch.log(1 + torch.exp(-(logit[i] - logit[j])))
                count += 1
    return total / count


@pytest.mark.parametrize("name", ["mse", "bce", "focal", "ranking"])
@pytest.mark.parametrize("seed", range(3))
def test_each_loss_matches_direct_formula_and_backpropagates(name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    # float32, as in training; the reference is computed in float64
    logit = (torch.randn(16, generator=gen) * 2).requires_grad_()
    target = torch.rand(16, generator=gen)
    correct = (torch.rand(16, generator=gen) < 0.6).long()
    kwargs = {"focal_alpha": 0.3, "focal_gamma": 2.0}
    loss = LOSSES[name](logit, target, correct, **kwargs)
    assert loss.dim() == 0
    expected = _direct(name, logit.detach().double(), target.double(), correct,
                       alpha=0.3, gamma=2.0)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert logit.grad is not None
    assert torch.all(torch.isfinite(logit.grad))
    assert logit.grad.abs().sum() > 0
    # gradient agrees with autograd through the direct formula
    logit2 = logit.detach().double().requires_grad_()
    _direct(name, logit2, target.double(), correct, alpha=0.3, gamma=2.0).backward()
    torch.testing.assert_close(logit.grad.double(), logit2.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["mse", "bce", "focal", "ranking"])
def test_losses_accept_extra_keyword_arguments(name: str) -> None:
    """Stages pass the focal keywords to every loss."""
    loss = LOSSES[name](LOGIT, TARGET, CORRECT, focal_alpha=0.25, focal_gamma=5.0)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("name", ["bce", "focal"])
def test_classification_losses_stable_at_extreme_logits(name: str) -> None:
    logit = torch.tensor([80.0, -80.0, 80.0, -80.0], requires_grad=True)
    correct = torch.tensor([1, 0, 0, 1])  # two right, two badly wrong
    loss = LOSSES[name](logit, torch.zeros(4), correct)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(logit.grad))
    assert float(loss.detach()) > 1.0  # the wrong ones cost ~80 each (times weights)


def test_mse_gradient_pulls_confidence_toward_target() -> None:
    logit = torch.zeros(2, requires_grad=True)  # c = 0.5
    mse_loss(logit, torch.tensor([0.9, 0.1]), torch.tensor([1, 0])).backward()
    assert logit.grad[0] < 0 < logit.grad[1]  # gradient descent raises c0, lowers c1


# ------------------------------------------------------------------------------ registry


def test_registry_unknown_name_lists_valid_ones() -> None:
    with pytest.raises(KeyError, match=r"unknown loss 'hinge'; valid: bce, focal, mse, ranking"):
        LOSSES["hinge"]
    assert "mse" in LOSSES and "hinge" not in LOSSES
    assert list(LOSSES) == ["mse", "bce", "focal", "ranking"]  # registration order


def test_registry_rejects_duplicate_names() -> None:
    reg: Registry[int] = Registry("thing")
    reg.register("a")(1)
    with pytest.raises(ValueError, match="'a' is registered twice"):
        reg.register("a")(2)
    assert reg["a"] == 1
    assert reg.items() == [("a", 1)]


def test_functional_reference_sanity() -> None:
    """The direct formulas above agree with torch.nn.functional (guards the reference)."""
    logit, target, correct = LOGIT.double(), TARGET.double(), CORRECT
    torch.testing.assert_close(
        _direct("bce", logit, target, correct),
        F.binary_cross_entropy_with_logits(logit, correct.double()),
    )


@pytest.mark.parametrize("name", ["mse", "bce"])
def test_error_weight_multiplies_the_errors_terms(name: str) -> None:
    """``error_weight`` w: the loss is the mean of per-sample terms, each error's times w
    (the authors' ``weighting``); w = 1 is the unweighted loss."""
    logit = torch.tensor([2.0, -1.0, 0.5, -3.0])
    target = torch.tensor([0.9, 0.2, 0.7, 0.1])
    correct = torch.tensor([1, 0, 1, 0])
    c = torch.sigmoid(logit)
    y = correct.float()
    terms = {"mse": (c - target) ** 2,
             "bce": -(y * torch.log(c) + (1 - y) * torch.log(1 - c))}[name]
    weights = torch.tensor([1.0, 3.0, 1.0, 3.0])
    got = LOSSES[name](logit, target, correct, error_weight=3.0)
    torch.testing.assert_close(got, (weights * terms).mean())
    torch.testing.assert_close(LOSSES[name](logit, target, correct, error_weight=1.0),
                               terms.mean())
    assert got > LOSSES[name](logit, target, correct)


def _focal_by_hand(logit: torch.Tensor, correct: torch.Tensor, alpha: float,
                   gamma: float) -> torch.Tensor:
    """The focal loss as written before torchvision's: alpha_t (1 - p_t)^gamma BCE, p_t the
    probability given to the true binary label ('correct' positive)."""
    y = correct.to(logit.dtype)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logit, y, reduction="none")
    p_t = torch.exp(-bce)
    alpha_t = alpha * y + (1 - alpha) * (1 - y)
    return (alpha_t * (1 - p_t) ** gamma * bce).mean()


@pytest.mark.parametrize(("alpha", "gamma"), [(0.25, 5.0), (0.5, 2.0), (0.9, 0.0)])
def test_focal_loss_is_torchvisions_and_equals_the_hand_written_one(alpha: float,
                                                                    gamma: float) -> None:
    generator = torch.Generator().manual_seed(0)
    logit = torch.randn(512, generator=generator, dtype=torch.float64) * 4
    correct = (torch.rand(512, generator=generator) < 0.8).long()
    target = torch.rand(512, generator=generator, dtype=torch.float64)
    got = LOSSES["focal"](logit, target, correct, focal_alpha=alpha, focal_gamma=gamma)
    torch.testing.assert_close(got, _focal_by_hand(logit, correct, alpha, gamma),
                               rtol=1e-10, atol=1e-12)
    float32 = logit.float()  # the dtype training uses
    torch.testing.assert_close(
        LOSSES["focal"](float32, target, correct, focal_alpha=alpha, focal_gamma=gamma),
        _focal_by_hand(float32, correct, alpha, gamma), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ per-element weights


def _pixels(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A batch of 2 label maps of 6x7 pixels as fit_confidence sees it: logits, targets,
    correctness (-1 on void pixels, about a fifth) and the non-void mask. Void pixels hold
    arbitrary logits and targets: the weighted loss must not read them."""
    gen = torch.Generator().manual_seed(seed)
    logit = torch.randn(2, 6, 7, generator=gen, dtype=torch.float64) * 3
    target = torch.rand(2, 6, 7, generator=gen, dtype=torch.float64)
    correct = (torch.rand(2, 6, 7, generator=gen) < 0.7).long()
    keep = torch.rand(2, 6, 7, generator=gen) > 0.2
    return logit, target, correct.masked_fill(~keep, -1), keep


LOSS_KWARGS = [{}, {"error_weight": 3.0}, {"focal_alpha": 0.4, "focal_gamma": 2.5}]


@pytest.mark.parametrize("kwargs", LOSS_KWARGS, ids=["defaults", "error-weight", "focal"])
@pytest.mark.parametrize("name", LOSSES.names())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_void_weight_of_zero_equals_leaving_the_void_pixels_out(
        name: str, kwargs: dict[str, float], dtype: torch.dtype) -> None:
    """Segmentation's loss (fit_confidence): every pixel, void ones weighing 0 and their
    correctness clamped to 0, equals the loss of the non-void pixels selected out (what it
    replaces, which made the host wait for the device at each batch): the value and the
    gradient, to rounding (exactly in float64 up to summation order)."""
    for seed in range(3):
        logit, target, correct, keep = _pixels(seed)
        logit, target = logit.to(dtype), target.to(dtype)
        masked_logit = logit.clone().requires_grad_()
        masked = LOSSES[name](masked_logit[keep], target[keep], correct[keep], **kwargs)
        masked.backward()
        weighted_logit = logit.clone().requires_grad_()
        weighted = LOSSES[name](weighted_logit, target, correct.clamp(min=0),
                                weight=keep.to(dtype), **kwargs)
        weighted.backward()
        tolerance = {"rtol": 1e-12, "atol": 1e-14} if dtype == torch.float64 else {
            "rtol": 1e-5, "atol": 1e-7}
        torch.testing.assert_close(weighted, masked, **tolerance)
        assert masked_logit.grad is not None and weighted_logit.grad is not None
        torch.testing.assert_close(weighted_logit.grad, masked_logit.grad, **tolerance)
        # void pixels get no gradient, whatever their logit and target hold
        assert torch.all(weighted_logit.grad[~keep] == 0)
        moved = LOSSES[name](logit + 5 * (~keep), target.masked_fill(~keep, 0.9),
                             correct.clamp(min=0), weight=keep.to(dtype), **kwargs)
        torch.testing.assert_close(moved, weighted.detach(), **tolerance)


@pytest.mark.parametrize("name", LOSSES.names())
def test_a_weight_of_ones_is_the_unweighted_loss_and_all_void_is_zero(name: str) -> None:
    """Classification passes no weight; a weight of ones gives the same loss. A batch of
    void pixels only gives 0, still connected to the graph (selection gave NaN)."""
    logit, target, correct, _ = _pixels(0)
    correct = correct.clamp(min=0)
    torch.testing.assert_close(LOSSES[name](logit, target, correct, weight=torch.ones_like(logit)),
                               LOSSES[name](logit.flatten(), target.flatten(), correct.flatten()),
                               rtol=1e-12, atol=1e-14)
    leaf = logit.clone().requires_grad_()
    nothing = LOSSES[name](leaf, target, correct, weight=torch.zeros_like(logit))
    assert float(nothing.detach()) == 0.0
    nothing.backward()
    assert leaf.grad is not None and torch.all(leaf.grad == 0)
