"""Confidence scoring functions behind one registry (higher = more confident).

Each function takes a :class:`ScoringContext` and returns one score per sample of the
split being scored. Adding a baseline is one registered function (and its test).

- ``mcp``        maximum class probability (Hendrycks & Gimpel 2017; paper's baseline).
- ``mc_dropout`` T stochastic passes with dropout on (batch-norm in eval), negative
                 entropy of the mean softmax (Gal & Ghahramani 2016; paper Sec. 3.2).
- ``trustscore`` Jiang et al. 2018 as in their reference code with alpha = 0 (no
                 filtering): per-class nearest-neighbour indexes over the *training*
                 penultimate features; the distance to a class is the distance to its 2nd
                 nearest neighbour; score = distance to the closest other class /
                 (distance to the predicted class + 1e-12). Exact search with faiss.
- ``tcp_oracle`` the true class probability itself (needs the label): an upper bound.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.losses import true_class_probability
from pipeline.models import Classifier, enable_mc_dropout
from pipeline.registry import Registry


@dataclass
class ScoringContext:
    """What a scoring function may read for one split."""

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

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)


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
    network in one forward pass, so dropout masks differ per copy.
    """
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    if torch.device(device).type == "cuda":
        torch.cuda.manual_seed_all(seed)
    was_training = classifier.training
    enable_mc_dropout(classifier)
    try:
        per_chunk = max(1, batch_size // samples)
        outputs = []
        for start in range(0, len(inputs), per_chunk):
            chunk = inputs[start:start + per_chunk].to(device)
            repeated = chunk.expand(samples, *chunk.shape).reshape(-1, *chunk.shape[1:])
            logits = classifier(repeated).float()
            outputs.append(torch.softmax(logits, -1).view(samples, len(chunk), -1).cpu())
        return torch.cat(outputs, dim=1)
    finally:
        classifier.train(was_training)
        torch.random.set_rng_state(generator_state)


def negative_entropy(probs: np.ndarray) -> np.ndarray:
    return np.sum(probs * np.log(np.clip(probs, 1e-12, None)), axis=-1)


@SCORERS.register("mc_dropout")
def mc_dropout(ctx: ScoringContext) -> np.ndarray:
    if ctx.classifier is None or ctx.inputs is None:
        raise ValueError("mc_dropout needs the classifier and the split's inputs")
    cfg = ctx.params or {}
    probs = mc_dropout_probabilities(
        ctx.classifier, ctx.inputs, samples=cfg.get("mc_samples", 50),
        batch_size=cfg.get("batch_size", 4096), device=ctx.device, seed=ctx.seed,
    )
    return negative_entropy(probs.mean(0).double().numpy())


def second_neighbour_distances(
    train_features: np.ndarray, train_labels: np.ndarray, queries: np.ndarray, num_classes: int
) -> np.ndarray:
    """(N, K) Euclidean distance from each query to its 2nd nearest training point of
    each class (exact search, faiss ``IndexFlatL2``)."""
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    distances = np.full((len(queries), num_classes), np.inf, dtype=np.float64)
    for k in range(num_classes):
        members = np.ascontiguousarray(train_features[train_labels == k], dtype=np.float32)
        if len(members) < 2:
            continue  # a class with fewer than two points is never the nearest
        index = faiss.IndexFlatL2(members.shape[1])
        index.add(members)
        squared, _ = index.search(queries, 2)
        distances[:, k] = np.sqrt(np.maximum(squared[:, 1], 0.0))
    return distances


@SCORERS.register("trustscore")
def trust_score(ctx: ScoringContext) -> np.ndarray:
    num_classes = ctx.logits.shape[1]
    distances = second_neighbour_distances(
        ctx.train_features, ctx.train_labels, ctx.features, num_classes
    )
    rows = np.arange(len(distances))
    predicted = ctx.predictions
    to_predicted = distances[rows, predicted].copy()
    distances[rows, predicted] = np.inf
    return distances.min(axis=1) / (to_predicted + 1e-12)
