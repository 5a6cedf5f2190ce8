"""MC Dropout with 50 passes: the pipeline's batched passes against a plain loop of passes.

Batched is ``pipeline.baselines.mc_dropout_probabilities``: each chunk of
``batch_size // samples`` inputs is repeated ``samples`` times and sent through the network
in one forward pass (batch of ``batch_size`` rows; on a CPU fewer, so that the pass's
largest layer output stays under ``CPU_PASS_BYTES``: SmallConvNet's and VGG16's). The loop
is what one would write first: ``samples`` times, the whole input in chunks of
``batch_size`` rows, one pass each.
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

from pipeline.baselines import CPU_PASS_BYTES, inputs_per_pass, mc_dropout_probabilities
from pipeline.config import read_yaml
from pipeline.models import (
    Classifier,
    SmallConvNetMNIST,
    build_classifier,
    build_mlp,
    enable_mc_dropout,
)
from pipeline.settings import compose

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
    p.add_argument("--vgg-inputs", type=int, default=20)
    args = p.parse_args()
    report = _bench.Report("MC Dropout (50 passes): batched against looped", args)
    torch.manual_seed(0)
    mnist, cifar = (1, 28, 28), (3, 32, 32)
    vgg = read_yaml(compose(["setting=cifar10_vgg16"]))["classifier"]
    models: list[tuple[str, Classifier, tuple[int, ...], int]] = [
        ("MLP 784-1000-10", build_mlp(mnist, 10, {"hidden": 1000, "dropout": 0.3}), mnist,
         16 if args.quick else args.mlp_inputs),
        ("SmallConvNet (MNIST)", SmallConvNetMNIST(mnist, 10, 128, 0.5), mnist,
         8 if args.quick else args.conv_inputs)]
    if not args.quick:
        models.append(("VGG16 (CIFAR-10)", build_classifier(cifar, 10, vgg), cifar,
                       args.vgg_inputs))
    samples, batch = (4, 16) if args.quick else (SAMPLES, BATCH)
    rows = []
    for name, model, shape, n in models:
        x = torch.randn(n, *shape)
        per_pass = inputs_per_pass(model, x, samples, batch, "cpu")
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
        rows.append([name, f"{n:,} x {samples}", f"{min(per_pass, n) * samples:,}",
                     f"{t['batched']:.2f}", f"{t['looped']:.2f}",
                     f"**{t['looped'] / t['batched']:.2f}x**", f"{same:.1e}",
                     f"{mean_diff:.3f} (one pass: {spread:.3f})"])
        assert same < 1e-5, f"{name}: without dropout the two differ by {same}"
    report.add(_bench.table(
        ["model", "inputs x passes", "batched rows a pass", "batched, s", "looped, s",
         "looped / batched",
         "max abs diff, dropout off", "max abs diff of mean probabilities, dropout on"],
        rows))
    report.add(
        f"Batched: `mc_dropout_probabilities(samples={samples}, batch_size={batch})`, whose "
        f"passes on a CPU keep their largest layer output under "
        f"{CPU_PASS_BYTES // 2**20} MiB (`pipeline.baselines.CPU_PASS_BYTES`); looped: "
        f"{samples} passes over the inputs in chunks of {batch}. Seconds, the fastest of "
        f"{args.repeats} interleaved repeats. Same seed, different masks (see the script's "
        f"docstring): with dropout off both give the same probabilities; with it on, the "
        f"mean over passes agrees within Monte Carlo noise.")
    report.close()


if __name__ == "__main__":
    main()
