"""Wall time and peak memory of the image (cluster) bootstrap at CamVid's test size.

Synthetic per-pixel data shaped like the CamVid test split (233 images of 360 x 480, every
pixel scored), one or more methods, the evaluate stage's call to
:func:`pipeline.metrics.bootstrap_draws` with ``groups``; then the gap between the rank-bin
metrics and the exact ones on the full sample (every image drawn once), which is the
resolution error of each draw.

    OMP_NUM_THREADS=1 python benchmarks/grouped_bootstrap.py --resamples 1000

Run it single-threaded (``OMP_NUM_THREADS=1``) to get the figure the README quotes.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np

from pipeline.metrics import (
    GROUPED_RESOLUTION,
    METRIC_NAMES,
    _compact_groups,
    _RankBins,
    bootstrap_draws,
    failure_metrics,
)


def synthetic(images: int, pixels: int, methods: int, seed: int,
              ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Scores (float32, as the stages write them), correctness and image ids: each image
    has its own error rate, and errors score lower on average."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(images, dtype=np.int32), pixels)
    error_rate = rng.uniform(0.02, 0.3, images)[groups]
    correct = (rng.random(groups.size) > error_rate).astype(np.int8)
    scores = {}
    for m in range(methods):
        logit = rng.standard_normal(groups.size, dtype=np.float32) + 2.0 * correct
        scores[f"method{m}"] = (1 / (1 + np.exp(-logit))).astype(np.float32)
    return scores, correct, groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=233)
    parser.add_argument("--pixels", type=int, default=360 * 480, help="per image")
    parser.add_argument("--methods", type=int, default=1)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--resolution", type=int, default=GROUPED_RESOLUTION)
    parser.add_argument("--no-exact", action="store_true",
                        help="skip the resolution check against the exact metrics")
    args = parser.parse_args()
    scores, correct, groups = synthetic(args.images, args.pixels, args.methods, 0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, cpu = time.perf_counter(), time.process_time()
    bootstrap_draws(scores, correct, args.resamples, 0, groups=groups,
                    resolution=args.resolution)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"pixels": int(correct.size), "images": args.images, "methods": args.methods,
           "resamples": args.resamples, "resolution": args.resolution,
           "bootstrap_seconds": round(seconds, 1),
           # CPU time: the wall time of an unloaded single-threaded run
           "bootstrap_cpu_seconds": round(cpu, 1),
           "peak_rss_gib": round(peak / 2**20, 2),
           "peak_rss_gib_before_bootstrap": round(before / 2**20, 2)}
    if not args.no_exact:
        conf = scores["method0"].astype(np.float64)
        group, n_groups = _compact_groups(groups, correct.size)
        binned = _RankBins.of(conf, correct.astype(np.int64), group, n_groups,
                              args.resolution)
        approx = dict(zip(METRIC_NAMES, binned.metrics(np.ones((1, n_groups)))[0],
                          strict=True))
        exact = failure_metrics(conf, correct)
        out["resolution_error"] = {k: float(abs(approx[k] - exact[k])) for k in METRIC_NAMES}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
