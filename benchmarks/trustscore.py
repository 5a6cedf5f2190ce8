"""TrustScore: the pipeline's (faiss, exact, per class) against a scikit-learn KD-tree
implementation of the same definition, and at segmentation scale.

The definition (Jiang et al. 2018, their reference code with alpha = 0, no filtering): one
nearest-neighbour index per class over the training features; the distance of a query to a
class is the distance to that class's 2nd nearest training point; the score is the
distance to the closest class other than the predicted one over (the distance to the
predicted class + 1e-12). Ours is ``pipeline.baselines.trust_score`` (faiss
``IndexFlatL2``, float32); the reference below builds a ``sklearn.neighbors.KDTree`` per
class and queries it for 2 neighbours (float64), as the authors of TrustScore do.

1. Classification scale (default 50,000 x 512 training features, 10 classes, 10,000
   queries): the scores must agree to 1e-5 relative (asserted), and the speed ratio.
2. Segmentation scale (1,000,000 training pixels x 64, 11 classes): our time and peak
   memory, in a fresh process (``resource.getrusage`` peak RSS: everything, faiss's C++
   buffers included; ``tracemalloc`` peak: the numpy arrays only). Exact search costs
   queries x training points x dims, so ``--seg-queries`` (default 20,000) are measured
   and the time for 1,000,000 is projected linearly; ``--seg-queries 1000000`` measures
   it (about 20 minutes on 2 cores). scikit-learn runs at a smaller size
   (``--seg-sklearn``, 100,000 training pixels, 5,000 queries), with both timed there.

The features are synthetic: class centres plus Gaussian noise, float32.

    python benchmarks/trustscore.py --out benchmarks/results/trustscore.md
"""

from __future__ import annotations

import multiprocessing
import resource
import time
import tracemalloc
from functools import partial
from typing import Any

import _bench
import numpy as np
from sklearn.neighbors import KDTree

from pipeline.baselines import ScoringContext, trust_score


def synthetic(n_train: int, n_queries: int, dims: int, classes: int,
              seed: int = 0) -> dict[str, np.ndarray]:
    """Training features and labels, query features and logits (predictions 80% right)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dims)).astype(np.float32)
    train_labels = rng.integers(0, classes, n_train)
    labels = rng.integers(0, classes, n_queries)

    def points(of: np.ndarray) -> np.ndarray:
        out = rng.normal(0, 1, (len(of), dims)).astype(np.float32)
        out += centres[of]
        return out

    logits = rng.normal(0, 1, (n_queries, classes)).astype(np.float32)
    hit = rng.random(n_queries) < 0.8
    logits[np.arange(n_queries)[hit], labels[hit]] += 5
    return {"train_features": points(train_labels), "train_labels": train_labels,
            "features": points(labels), "labels": labels, "logits": logits}


def ours(data: dict[str, np.ndarray]) -> np.ndarray:
    return trust_score(ScoringContext(
        logits=data["logits"], labels=data["labels"], features=data["features"],
        train_features=data["train_features"], train_labels=data["train_labels"]))


def kdtree(data: dict[str, np.ndarray]) -> np.ndarray:
    """The reference definition with scikit-learn KD-trees (float64)."""
    logits, queries = data["logits"], data["features"]
    classes = logits.shape[1]
    distances = np.full((len(queries), classes), np.inf)
    for k in range(classes):
        members = data["train_features"][data["train_labels"] == k]
        if len(members) >= 2:
            distances[:, k] = KDTree(members).query(queries, k=2)[0][:, 1]
    rows, predicted = np.arange(len(queries)), logits.argmax(1)
    to_predicted = distances[rows, predicted].copy()
    distances[rows, predicted] = np.inf
    return distances.min(axis=1) / (to_predicted + 1e-12)


def max_rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b) / np.abs(b)))


def segmentation_run(n_train: int, n_queries: int, dims: int, classes: int,
                     threads: int | None) -> dict[str, Any]:
    """In a fresh process: seconds and peak memory of ours at this size."""
    set_threads(threads)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    data = synthetic(n_train, n_queries, dims, classes)
    inputs = tracemalloc.get_traced_memory()[0]
    start = time.perf_counter()
    scores = ours(data)
    seconds = time.perf_counter() - start
    peak_numpy = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "base_rss": base_rss, "inputs": inputs, "peak_numpy": peak_numpy,
            "finite": bool(np.isfinite(scores).all())}


def set_threads(threads: int | None) -> None:
    if threads:
        import faiss

        faiss.omp_set_num_threads(threads)


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--train", type=int, default=50_000)
    p.add_argument("--dims", type=int, default=512)
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--seg-train", type=int, default=1_000_000)
    p.add_argument("--seg-queries", type=int, default=20_000)
    p.add_argument("--seg-sklearn", type=int, nargs=2, default=(100_000, 5_000),
                   metavar=("TRAIN", "QUERIES"))
    args = p.parse_args()
    if args.quick:
        args.train, args.dims, args.queries = 2_000, 32, 500
        args.seg_train, args.seg_queries, args.seg_sklearn = 20_000, 2_000, (2_000, 200)
    set_threads(args.threads)
    report = _bench.Report("TrustScore: faiss (ours) against scikit-learn KD-trees", args)
    rows = []
    for label, (n, q, d, k) in {
            "classification": (args.train, args.queries, args.dims, 10),
            "segmentation, scikit-learn's size": (*args.seg_sklearn, 64, 11)}.items():
        data = synthetic(n, q, d, k)
        t = _bench.interleaved({"ours": partial(ours, data)}, args.repeats)
        t["sklearn"], reference = _bench.timed(partial(kdtree, data))  # once: it is slow
        diff = max_rel_diff(ours(data), reference)
        assert diff <= 1e-5, f"{label}: scores differ by {diff:.2e} relative (> 1e-5)"
        rows.append([label, f"{n:,} x {d}, {k} classes", f"{q:,}", f"{t['ours']:.2f}",
                     f"{t['sklearn']:.2f}", f"**{t['sklearn'] / t['ours']:.1f}x**",
                     f"{diff:.1e}"])
    report.add(_bench.table(["scale", "training features", "queries", "ours, s",
                             "scikit-learn KDTree, s", "speed-up", "max rel diff of scores"],
                            rows))
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        seg = pool.apply(segmentation_run, (args.seg_train, args.seg_queries, 64, 11,
                                                 args.threads))
    assert seg["finite"]
    full = 1_000_000
    projected = seg["seconds"] * full / args.seg_queries
    mib = 1024  # ru_maxrss is in KiB on Linux
    report.add(_bench.table(
        ["training pixels", "queries", "ours, s", f"projected to {full:,} queries, s",
         "peak RSS, MiB (process at start)", "numpy peak, MiB (inputs)"],
        [[f"{args.seg_train:,} x 64, 11 classes", f"{args.seg_queries:,}",
          f"{seg['seconds']:.1f}", f"{projected:.0f} ({projected / 60:.1f} min)",
          f"{seg['peak_rss'] / mib:,.0f} ({seg['base_rss'] / mib:,.0f})",
          f"{seg['peak_numpy'] / 2**20:,.0f} ({seg['inputs'] / 2**20:,.0f})"]]))
    report.add(
        f"Seconds, ours the fastest of {args.repeats} runs, scikit-learn's one run. "
        f"Segmentation scale in a fresh process: peak RSS from "
        f"`resource.getrusage` (whole process: interpreter, torch, faiss buffers), numpy "
        f"peak from `tracemalloc` (numpy arrays only: inputs, distances, scores). "
        f"Projection: exact search time is linear in the queries.")
    report.close()


if __name__ == "__main__":
    main()
