"""Confidence criteria (what ConfidNet learns) and losses (how it learns it).

Criteria (paper Sec. 2.1):
- ``tcp``   eq. (2): the softmax probability of the true class.
- ``tcp_r`` eq. (3): TCP divided by MCP; 1 for correct predictions, < 1 for errors.

Losses take ConfidNet's pre-sigmoid logit ``u`` (confidence ``c = sigmoid(u)``), the
criterion target and the 0/1 correctness of the frozen classifier's prediction:
- ``mse``     eq. (4): mean((c - target)^2). The paper's loss.
- ``bce``     binary cross-entropy between c and 1[correct] (paper Sec. 2.2, Table 4).
- ``focal``   alpha_t (1 - p_t)^gamma BCE on 1[correct] (Lin et al. 2017; authors'
              defaults alpha 0.25, gamma 5).
- ``ranking`` pairwise logistic ranking loss inside the batch: every pair whose criterion
              targets differ is pushed to the same order in u. With ``tcp_r`` this ranks
              every correct prediction above every error; the authors used a structured
              AP loss instead, which needs a compiled solver (valeoai/ConfidNet).

``bce`` and ``focal`` read correctness only; ``mse`` and ``ranking`` read the criterion.

``mse`` and ``bce`` take ``error_weight`` (``confidnet.error_weight``, 1 = none): the loss
of each sample the classifier gets wrong is multiplied by it, as the ``weighting`` option
of the authors' losses does. It counters how few errors a well-trained classifier makes
on its own training set. Focal loss has its own class weight (``focal_alpha``); the
ranking loss weighs pairs, not samples.

Every loss also takes ``weight``, a per-element weight of the same shape as ``logit``
(segmentation: 0 on void pixels, 1 elsewhere; ``None``: every element 1). The loss is then
the weighted mean, sum(weight * term) / sum(weight), the normaliser kept on the device:
with a 0/1 weight, the loss of the selected elements alone, without selecting them (a
selection has a data-dependent size, which makes the host wait for the device at every
batch). The ranking loss weighs each pair by the product of its two elements' weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from pipeline.registry import Registry

if TYPE_CHECKING:
    import torch

# torch is imported where a function runs, not here: validating params.yaml reads these
# registries' names (pipeline.config), and stages that train nothing must not pay for torch.
Criterion = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]
CRITERIA: Registry[Criterion] = Registry("criterion")


@CRITERIA.register("tcp")
def true_class_probability(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Paper eq. (2): P(Y = y* | w, x)."""
    return probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@CRITERIA.register("tcp_r")
def normalised_true_class_probability(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Paper eq. (3): TCP / MCP."""
    return true_class_probability(probs, labels) / probs.max(dim=-1).values


LossFn = Callable[..., "torch.Tensor"]
LOSSES: Registry[LossFn] = Registry("loss")


ERROR_WEIGHTED_LOSSES = ("mse", "bce")


def _error_weights(correct: torch.Tensor, error_weight: float) -> torch.Tensor:
    """``error_weight`` for the classifier's errors, 1 for its correct predictions."""
    import torch

    return torch.where(correct.bool(), 1.0, error_weight)


def _weighted_mean(terms: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum(weight * terms) / sum(weight), on the device; 0 (still connected to the graph)
    when every weight is 0."""
    import torch

    return (terms * weight).sum() / weight.sum().clamp(min=torch.finfo(weight.dtype).tiny)


@LOSSES.register("mse")
def mse_loss(logit: torch.Tensor, target: torch.Tensor, correct: torch.Tensor,
             error_weight: float = 1.0, weight: torch.Tensor | None = None,
             **_: float) -> torch.Tensor:
    """Paper eq. (4); errors' terms multiplied by ``error_weight``."""
    import torch
    import torch.nn.functional as F

    if error_weight == 1.0 and weight is None:
        return F.mse_loss(torch.sigmoid(logit), target)
    squared = (torch.sigmoid(logit) - target) ** 2
    if error_weight != 1.0:
        squared = _error_weights(correct, error_weight) * squared
    return squared.mean() if weight is None else _weighted_mean(squared, weight)


@LOSSES.register("bce")
def bce_loss(logit: torch.Tensor, target: torch.Tensor, correct: torch.Tensor,
             error_weight: float = 1.0, weight: torch.Tensor | None = None,
             **_: float) -> torch.Tensor:
    """Binary cross-entropy on 1[correct]; errors' terms multiplied by ``error_weight``."""
    import torch.nn.functional as F

    errors = None if error_weight == 1.0 else _error_weights(correct, error_weight)
    if weight is None:
        return F.binary_cross_entropy_with_logits(logit, correct.to(logit.dtype), weight=errors)
    terms = F.binary_cross_entropy_with_logits(logit, correct.to(logit.dtype), weight=errors,
                                               reduction="none")
    return _weighted_mean(terms, weight)


@LOSSES.register("focal")
def focal_loss(logit: torch.Tensor, target: torch.Tensor, correct: torch.Tensor,
               focal_alpha: float = 0.25, focal_gamma: float = 5.0,
               weight: torch.Tensor | None = None, **_: float) -> torch.Tensor:
    """Focal loss (Lin et al. 2017, eq. 5) with 'correct' as the positive class:
    torchvision's ``sigmoid_focal_loss``, ``alpha`` weighing correct predictions and
    ``1 - alpha`` errors, averaged over the batch."""
    from torchvision.ops import sigmoid_focal_loss

    terms = sigmoid_focal_loss(logit, correct.to(logit.dtype), alpha=focal_alpha,
                               gamma=focal_gamma, reduction="mean" if weight is None else "none")
    return terms if weight is None else _weighted_mean(terms, weight)


@LOSSES.register("ranking")
def ranking_loss(logit: torch.Tensor, target: torch.Tensor, correct: torch.Tensor,
                 weight: torch.Tensor | None = None, **_: float) -> torch.Tensor:
    """Mean of log(1 + exp(-(u_i - u_j))) over batch pairs with target_i > target_j.

    A batch with no ordered pair (all targets equal) contributes zero loss, still
    connected to the graph so an optimiser step is well defined. Computed over all pairs
    with a 0/1 weight, not by selecting the ordered ones: selecting would make the host
    wait for the device at every batch. With ``weight``, pair (i, j) weighs
    ``weight_i * weight_j`` as well (elements are flattened first).
    """
    import torch.nn.functional as F

    if weight is not None:
        logit, target, weight = logit.flatten(), target.flatten(), weight.flatten()
    ordered = (target.unsqueeze(1) > target.unsqueeze(0)).to(logit.dtype)
    if weight is not None:
        ordered = ordered * (weight.unsqueeze(1) * weight.unsqueeze(0))
    margins = logit.unsqueeze(1) - logit.unsqueeze(0)
    return _weighted_mean(F.softplus(-margins), ordered)


def loss_kwargs(params: Mapping[str, Any]) -> dict[str, float]:
    """The keyword arguments of the loss ``params['loss']``, from ``params['confidnet']``
    (every loss takes them all and reads its own)."""
    cfg = params["confidnet"]
    return {"focal_alpha": cfg["focal_alpha"], "focal_gamma": cfg["focal_gamma"],
            "error_weight": cfg["error_weight"]}
