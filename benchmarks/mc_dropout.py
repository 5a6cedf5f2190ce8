"""MC Dropout with 50 passes: the pipeline's batched passes against a plain loop of passes.

Batched is ``pipeline.baselines.mc_dropout_probabilities``: each chunk of
``batch_size // samples`` inputs is repeated ``samples`` times and sent through the network
in one forward pass (batch of ``batch_size`` rows). The loop is what one would write
first: ``samples`` times, the whole input in chunks of ``batch_size`` rows, one pass each.
Both run the same FLOPs with the same dropout-on, batch-norm-eval model; the difference is
how many rows each forward pass has and how often the weights are read.

Do they agree? Not pass for pass, by design: both seed torch's generator with ``seed``, but
the batched version draws one dropout mask tensor per chunk for all passes at once, the
loop one per pass, so the same seed gives different (equally distributed) masks. So the
script checks (1) with every dropout rate set to 0 the two give the same probabilities
(to float32 rounding): the batching changes nothing but the masks; (2) with dropout on,
their mean probabilities over the passes differ by no more than Monte Carlo noise
(reported next to the spread of one pass around the mean).

    python benchmarks/mc_dropout.py --out benchmarks/results/mc_dropout.md
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import partial

import _bench
import torch
from torch import nn

from pipeline.baselines import mc_dropout_probabilities
from pipeline.models import Classifier, SmallConvNetMNIST, build_mlp, enable_mc_dropout

SAMPLES, BATCH = 50, 4096


@torch.no_grad()
def looped(classifier: Classifier, inputs: torch.Tensor, samples: int, batch_size: int,
           seed: int) -> torch.Tensor:
    """``samples`` plain passes over ``inputs`` in chunks of ``batch_size``: (samples, N, K)."""
    torch.manual_seed(seed)
    enable_mc_dropout(classifier)
    return torch.stack([torch.cat([torch.softmax(classifier(inputs[i:i + batch_size]), -1)
                                   for i in range(0, len(inputs), batch_size)])
                        for _ in range(samples)])


def without_dropout(classifier: Classifier) -> Classifier:
    quiet = copy.deepcopy(classifier)
    for module in quiet.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
    return quiet


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--mlp-inputs", type=int, default=2_000)
    p.add_argument("--conv-inputs", type=int, default=200)
    args = p.parse_args()
    report = _bench.Report("MC Dropout (50 passes): batched against looped", args)
    torch.manual_seed(0)
    shape = (1, 28, 28)
    models: list[tuple[str, Classifier, int]] = [
        ("MLP 784-1000-10", build_mlp(shape, 10, {"hidden": 1000, "dropout": 0.3}),
         16 if args.quick else args.mlp_inputs),
        ("SmallConvNet (MNIST)", SmallConvNetMNIST(shape, 10, 128, 0.5),
         8 if args.quick else args.conv_inputs)]
    samples, batch = (4, 16) if args.quick else (SAMPLES, BATCH)
    rows = []
    for name, model, n in models:
        x = torch.randn(n, *shape)
        runs: dict[str, Callable[[], object]] = {
            "batched": partial(mc_dropout_probabilities, model, x, samples, batch),
            "looped": partial(looped, model, x, samples, batch, 0)}
        t = _bench.interleaved(runs, args.repeats)
        batched, loop = (mc_dropout_probabilities(model, x, samples, batch, seed=0),
                         looped(model, x, samples, batch, 0))
        quiet = without_dropout(model)
        same = (mc_dropout_probabilities(quiet, x, samples, batch)
                - looped(quiet, x, samples, batch, 0)).abs().max().item()
        mean_diff = (batched.mean(0) - loop.mean(0)).abs().max().item()
        spread = (loop - loop.mean(0)).abs().max().item()
        rows.append([name, f"{n:,} x {samples}", f"{t['batched']:.2f}", f"{t['looped']:.2f}",
                     f"**{t['looped'] / t['batched']:.2f}x**", f"{same:.1e}",
                     f"{mean_diff:.3f} (one pass: {spread:.3f})"])
        assert same < 1e-5, f"{name}: without dropout the two differ by {same}"
    report.add(_bench.table(
        ["model", "inputs x passes", "batched, s", "looped, s", "looped / batched",
         "max abs diff, dropout off", "max abs diff of mean probabilities, dropout on"],
        rows))
    report.add(
        f"Batched: `mc_dropout_probabilities(samples={samples}, batch_size={batch})`; looped: "
        f"{samples} passes over the inputs in chunks of {batch}. Seconds, the fastest of "
        f"{args.repeats} interleaved repeats. Same seed, different masks (see the script's "
        f"docstring): with dropout off both give the same probabilities; with it on, the "
        f"mean over passes agrees within Monte Carlo noise.")
    report.close()


if __name__ == "__main__":
    main()
