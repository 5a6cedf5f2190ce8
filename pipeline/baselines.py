"""Confidence scoring functions behind one registry (higher = more confident).

Each function takes a :class:`ScoringContext` and returns one score per sample of the
split being scored. Adding a baseline is one registered function (and its test).

- ``mcp``        maximum class probability (Hendrycks & Gimpel 2017; paper's baseline).
- ``mcp_temperature`` MCP of softmax(logits / T), T > 0 fitted on the *validation*
                 split by minimising its NLL (temperature scaling, Guo et al. 2017).
                 Same predictions as MCP; same ranking only for K = 2 (see
                 :func:`mcp_temperature`).
- ``entropy``    negative predictive entropy of the softmax, sum_k p_k log p_k.
- ``max_logit``  the maximum logit, max_k z_k (Hendrycks et al. 2022, "Scaling OOD").
- ``energy``     negative free energy T logsumexp(z / T), T = 1 (Liu et al. 2020).
- ``doctor``     -D_alpha of DOCTOR (Granese et al. 2021) at temperature 1 without
                 input perturbation: g = 1 - sum_k p_k^2, D_alpha = g / (1 - g).
- ``mc_dropout`` T stochastic passes with dropout on (batch-norm in eval), negative
                 entropy of the mean softmax (Gal & Ghahramani 2016; paper Sec. 3.2).
- ``mc_dropout_mutual_information`` the negative mutual information (BALD, Houlsby et
                 al. 2011) of the *same* passes: -(H[mean p_t] - mean H[p_t]).
- ``trustscore`` Jiang et al. 2018 as in their reference code with alpha = 0 (no
                 filtering): per-class nearest-neighbour indexes over the *training*
                 penultimate features; the distance to a class is the distance to its 2nd
                 nearest neighbour; score = distance to the closest other class /
                 (distance to the predicted class + 1e-12). Exact search with faiss, on
                 the GPU when the scoring device is CUDA and faiss is a GPU build.
- ``tcp_oracle`` the true class probability itself (needs the label): an upper bound.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any, Literal

import numpy as np
import torch
from scipy.special import logsumexp

from pipeline.losses import true_class_probability
from pipeline.models import Classifier, enable_mc_dropout
from pipeline.registry import Registry
from pipeline.runtime import compute


@dataclass
class ScoringContext:
    """What a scoring function may read for one split.

    ``val_logits`` / ``val_labels`` are the *validation* split's, whatever split is being
    scored: the methods that fit something (``mcp_temperature``) fit it there.
    """

    logits: np.ndarray  # (N, K) of the frozen classifier
    labels: np.ndarray  # (N,)
    features: np.ndarray  # (N, D) penultimate features
    train_features: np.ndarray
    train_labels: np.ndarray
    classifier: Classifier | None = None
    inputs: torch.Tensor | None = None
    device: torch.device | str = "cpu"
    seed: int = 0
    params: dict[str, Any] | None = None
    val_logits: np.ndarray | None = None  # (N_val, K)
    val_labels: np.ndarray | None = None  # (N_val,)
    # Segmentation (pipeline.segmentation): a batch of pixels' MC Dropout passes computed
    # by the caller, (samples, N, K), and TrustScore's index of training pixels, built once.
    precomputed_mc: torch.Tensor | None = None
    neighbours: ClassIndexes | None = None

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @cached_property
    def mc_dropout_samples(self) -> torch.Tensor:
        """Softmax of the MC Dropout passes, (samples, N, K), computed once per context
        so every MC Dropout scorer reads the same passes. Settings from ``params``
        (``mc_samples``, default 50; ``batch_size``, default 4096) and ``seed``; do not
        change them on a context after the first read."""
        if self.precomputed_mc is not None:
            return self.precomputed_mc
        if self.classifier is None or self.inputs is None:
            raise ValueError("MC Dropout needs the classifier and the split's inputs")
        cfg = self.params or {}
        return mc_dropout_probabilities(
            self.classifier, self.inputs, samples=cfg.get("mc_samples", 50),
            batch_size=cfg.get("batch_size", 4096), device=self.device, seed=self.seed,
        )


Scorer = Callable[[ScoringContext], np.ndarray]
SCORERS: Registry[Scorer] = Registry("scoring function")


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1).numpy()


@SCORERS.register("mcp")
def maximum_class_probability(ctx: ScoringContext) -> np.ndarray:
    return softmax(ctx.logits).max(axis=1)


@SCORERS.register("tcp_oracle")
def tcp_oracle(ctx: ScoringContext) -> np.ndarray:
    probs = torch.as_tensor(softmax(ctx.logits))
    return true_class_probability(probs, torch.as_tensor(ctx.labels)).numpy()


# -------------------------------------------------------------------- logit-based scores


def negative_entropy(probs: np.ndarray) -> np.ndarray:
    return np.sum(probs * np.log(np.clip(probs, 1e-12, None)), axis=-1)


@SCORERS.register("entropy")
def entropy(ctx: ScoringContext) -> np.ndarray:
    """Negative Shannon entropy of the softmax, sum_k p_k log p_k (in nats, <= 0)."""
    return negative_entropy(softmax(ctx.logits))


@SCORERS.register("max_logit")
def max_logit(ctx: ScoringContext) -> np.ndarray:
    """max_k z_k (MaxLogit, Hendrycks et al. 2022), as float64."""
    return np.asarray(ctx.logits, dtype=np.float64).max(axis=1)


ENERGY_TEMPERATURE = 1.0


@SCORERS.register("energy")
def energy(ctx: ScoringContext) -> np.ndarray:
    """Negative free energy -E(x) = T logsumexp_k(z_k / T), T = 1 (Liu et al. 2020,
    "Energy-based Out-of-distribution Detection": E(x) = -T logsumexp_k(z_k / T), its
    sign flipped so that higher = more confident)."""
    t = ENERGY_TEMPERATURE
    return t * logsumexp(np.asarray(ctx.logits, dtype=np.float64) / t, axis=1)


@SCORERS.register("doctor")
def doctor(ctx: ScoringContext) -> np.ndarray:
    """-D_alpha of DOCTOR (Granese et al. 2021, "DOCTOR: A Simple Method for Detecting
    Misclassification Errors"): g(x) = 1 - sum_k p_k^2 (the Gini impurity of the
    softmax), D_alpha(x) = g(x) / (1 - g(x)); an error is flagged when D_alpha is large,
    so the confidence is -D_alpha = 1 - 1 / sum_k p_k^2, in [1 - K, 0].

    Choices: temperature 1 and no input perturbation (epsilon = 0), the paper's
    black-box setting: it tunes both per dataset on held-out data, and the perturbation
    needs input gradients of the classifier. The value is the paper's -D_alpha itself,
    not the order-equivalent sum_k p_k^2.
    """
    purity = np.sum(softmax(ctx.logits) ** 2, axis=1)  # 1 - g, >= 1/K > 0
    return -(1.0 - purity) / purity


# ------------------------------------------------------------------- temperature scaling

TEMPERATURE_BOUNDS = (1e-2, 1e2)


def temperature_nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` under softmax(logits / temperature)."""
    scaled = np.asarray(logits, dtype=np.float64) / temperature
    rows = np.arange(len(scaled))
    return float(np.mean(logsumexp(scaled, axis=1) - scaled[rows, np.asarray(labels)]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> float:
    """The T > 0 minimising :func:`temperature_nll` (Guo et al. 2017, Sec. 4.2).

    Bounded Brent search over log T in ``bounds``. The NLL is convex in 1 / T, hence
    unimodal in log T, so the search finds the global minimum inside the bounds. When
    the validation split has no error the NLL keeps decreasing as T -> 0 and the fit
    stops at the lower bound.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    if logits.ndim != 2 or len(logits) == 0 or len(labels) != len(logits):
        raise ValueError(
            f"temperature scaling needs (N, K) logits and N labels with N > 0; got "
            f"logits {logits.shape} and labels {labels.shape}"
        )
    # here, not at the top: scipy.optimize costs 0.2 s of import in every stage that
    # imports this module, and only the baselines stage fits a temperature
    from scipy.optimize import minimize_scalar

    result = minimize_scalar(
        lambda log_t: temperature_nll(logits, labels, float(np.exp(log_t))),
        bounds=(float(np.log(bounds[0])), float(np.log(bounds[1]))), method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.exp(result.x))


@SCORERS.register("mcp_temperature")
def mcp_temperature(ctx: ScoringContext) -> np.ndarray:
    """MCP of softmax(logits / T), T fitted on the validation split (Guo et al. 2017).

    T > 0 leaves every prediction unchanged. For K = 2 the MCP is sigmoid(|z_1 - z_2|
    / T), a monotone function of the margin, so the ranking and AUROC are those of MCP.
    For K > 2 the MCP depends on all the gaps to the top logit and T weighs them
    differently, so the ranking across samples, and the AUROC, can change (in either
    direction; usually slightly). Very small T saturates many scores to 1.0 in float64.
    """
    if ctx.val_logits is None or ctx.val_labels is None:
        raise ValueError(
            "mcp_temperature needs the validation split's logits and labels "
            "(ScoringContext.val_logits / val_labels) to fit the temperature"
        )
    temperature = fit_temperature(ctx.val_logits, ctx.val_labels)
    return softmax(np.asarray(ctx.logits, dtype=np.float64) / temperature).max(axis=1)


# ---------------------------------------------------------------------------- MC Dropout


# On a CPU, a pass whose layer outputs outgrow the caches runs at memory speed: 4,096 rows
# of SmallConvNet's activations made the batched passes half as fast as a plain loop. There
# a pass is sized so that its largest layer output stays under this many bytes (the fastest
# of 4 to 128 MiB for SmallConvNet and VGG16: benchmarks/README.md, "MC Dropout passes on a
# CPU"); on a GPU, ``batch_size`` rows alone bound it.
CPU_PASS_BYTES = 32 * 2**20


def largest_output_bytes(classifier: Classifier, inputs: torch.Tensor) -> int:
    """Bytes of the largest output of one of ``classifier``'s layers, for one row of
    ``inputs``: one forward pass in eval mode, which draws no random numbers."""
    largest = 0

    def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output[:1].numel() * output.element_size())

    handles = [m.register_forward_hook(hook) for m in classifier.modules()
               if not any(m.children())]
    was_training = classifier.training
    try:
        classifier.eval()
        classifier(inputs[:1])
    finally:
        classifier.train(was_training)
        for handle in handles:
            handle.remove()
    return largest


def inputs_per_pass(classifier: Classifier, inputs: torch.Tensor, samples: int,
                    batch_size: int, device: torch.device | str) -> int:
    """Inputs per batched MC Dropout pass, each repeated ``samples`` times: as many as
    ``batch_size`` rows hold, fewer on a CPU where the pass's largest layer output would
    outgrow :data:`CPU_PASS_BYTES`; at least one."""
    per_pass = max(1, batch_size // samples)
    if per_pass == 1 or torch.device(device).type != "cpu":
        return per_pass
    rows = CPU_PASS_BYTES // max(1, largest_output_bytes(classifier, inputs))
    return max(1, min(per_pass, rows // samples))


@torch.no_grad()
def mc_dropout_probabilities(
    classifier: Classifier,
    inputs: torch.Tensor,
    samples: int,
    batch_size: int,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> torch.Tensor:
    """Softmax of ``samples`` stochastic passes, shape (samples, N, K).

    Batched: each chunk of inputs is repeated ``samples`` times and sent through the
    network in one forward pass (:func:`inputs_per_pass` inputs: ``batch_size`` rows, fewer
    on a CPU for large activations), so dropout masks differ per copy. The inputs
    move to ``device`` once and the probabilities come back in one copy.
    """
    generator_state = torch.random.get_rng_state()
    was_training = classifier.training
    try:
        settings = compute()
        placed = settings.place(inputs, device)
        with settings.autocast(device):
            per_chunk = inputs_per_pass(classifier, placed, samples, batch_size, device)
        torch.manual_seed(seed)
        if torch.device(device).type == "cuda":
            torch.cuda.manual_seed_all(seed)
        enable_mc_dropout(classifier)
        outputs = []
        for start in range(0, len(placed), per_chunk):
            chunk = placed[start:start + per_chunk]
            repeated = chunk.expand(samples, *chunk.shape).reshape(-1, *chunk.shape[1:])
            with settings.autocast(device):
                logits = classifier(repeated).float()
            outputs.append(torch.softmax(logits, -1).view(samples, len(chunk), -1))
        return torch.cat(outputs, dim=1).cpu()
    finally:
        classifier.train(was_training)
        torch.random.set_rng_state(generator_state)


@SCORERS.register("mc_dropout")
def mc_dropout(ctx: ScoringContext) -> np.ndarray:
    """Negative entropy of the mean softmax of the passes (Gal & Ghahramani 2016)."""
    return negative_entropy(ctx.mc_dropout_samples.mean(0).double().numpy())


@SCORERS.register("mc_dropout_mutual_information")
def mc_dropout_mutual_information(ctx: ScoringContext) -> np.ndarray:
    """Negative mutual information between the prediction and the dropout masks (BALD,
    Houlsby et al. 2011; Gal et al. 2017): MI = H[mean_t p_t] -
    mean_t H[p_t] >= 0, over the same passes as ``mc_dropout``. Returns -MI, <= 0 up to
    rounding."""
    probs = ctx.mc_dropout_samples.double().numpy()
    return negative_entropy(probs.mean(0)) - negative_entropy(probs).mean(0)


# ---------------------------------------------------------------------------- TrustScore


FaissBackend = Literal["gpu", "cpu"]


def faiss_backend(device: torch.device | str, faiss_gpus: int) -> FaissBackend:
    """Where TrustScore's exact search runs: ``gpu`` when the scoring ``device`` is CUDA and
    the installed faiss sees ``faiss_gpus`` > 0 GPUs (a GPU build: ``pip install faiss-gpu``,
    see the README), else ``cpu``. A CUDA device with a CPU-only faiss says so, once per
    process (:func:`_say_faiss_has_no_gpu`)."""
    if torch.device(device).type != "cuda":
        return "cpu"
    if faiss_gpus > 0:
        return "gpu"
    _say_faiss_has_no_gpu()
    return "cpu"


@cache
def _say_faiss_has_no_gpu() -> None:
    sys.stderr.write("trustscore: CUDA is available but this faiss build has no GPU support; "
                     "searching on the CPU (install faiss-gpu in place of faiss-cpu: README, "
                     "'On a GPU')\n")


@cache
def _gpu_resources() -> Any:
    """One faiss ``StandardGpuResources`` (its scratch memory and streams) per process."""
    import faiss

    return faiss.StandardGpuResources()


def flat_l2_index(dim: int, device: torch.device | str = "cpu") -> Any:
    """An exact L2 index of ``dim``-d vectors: ``GpuIndexFlatL2`` (float32, no float16
    storage, so the distances are those of ``IndexFlatL2`` up to summation order) on the
    CUDA ``device`` when faiss can use it (:func:`faiss_backend`), else ``IndexFlatL2``."""
    import faiss

    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if faiss_backend(device, gpus) == "cpu":
        return faiss.IndexFlatL2(dim)
    config = faiss.GpuIndexFlatConfig()
    index = torch.device(device).index
    config.device = torch.cuda.current_device() if index is None else index
    config.useFloat16 = False
    return faiss.GpuIndexFlatL2(_gpu_resources(), dim, config)


class ClassIndexes:
    """One exact nearest-neighbour index per class over the training features
    (:func:`flat_l2_index`, on ``device``'s GPU when faiss can), built once and searched by
    as many query batches as needed."""

    def __init__(self, train_features: np.ndarray, train_labels: np.ndarray,
                 num_classes: int, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.indexes: dict[int, Any] = {}
        for k in range(num_classes):
            members = np.ascontiguousarray(train_features[train_labels == k], dtype=np.float32)
            if len(members) < 2:
                continue  # a class with fewer than two points is never the nearest
            index = flat_l2_index(members.shape[1], device)
            index.add(members)
            self.indexes[k] = index

    def second_neighbour_distances(self, queries: np.ndarray) -> np.ndarray:
        """(N, K) Euclidean distance from each query to its 2nd nearest training point
        of each class (inf for a class with fewer than two points)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        distances = np.full((len(queries), self.num_classes), np.inf, dtype=np.float64)
        for k, index in self.indexes.items():
            squared, _ = index.search(queries, 2)
            distances[:, k] = np.sqrt(np.maximum(squared[:, 1], 0.0))
        return distances


def second_neighbour_distances(
    train_features: np.ndarray, train_labels: np.ndarray, queries: np.ndarray, num_classes: int,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """(N, K) Euclidean distance from each query to its 2nd nearest training point of
    each class (exact search: :class:`ClassIndexes`)."""
    return ClassIndexes(train_features, train_labels, num_classes,
                        device).second_neighbour_distances(queries)


@SCORERS.register("trustscore")
def trust_score(ctx: ScoringContext) -> np.ndarray:
    num_classes = ctx.logits.shape[1]
    if ctx.neighbours is not None:
        distances = ctx.neighbours.second_neighbour_distances(ctx.features)
    else:
        distances = second_neighbour_distances(
            ctx.train_features, ctx.train_labels, ctx.features, num_classes, ctx.device
        )
    rows = np.arange(len(distances))
    predicted = ctx.predictions
    to_predicted = distances[rows, predicted].copy()
    distances[rows, predicted] = np.inf
    return distances.min(axis=1) / (to_predicted + 1e-12)
