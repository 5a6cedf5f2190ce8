"""Classifier and phase-1 epoch times against the arithmetic floor, measured in one run.

Each epoch is one call of the pipeline's own loop (``pipeline.training.train_classifier``
with ``epochs: 1``; ``fit_confidence`` for phase 1 in the authors' scheme,
``confidnet.features=dropout``, as ``stages/train_confidnet.py`` sets it up), on synthetic
data of the setting's real shapes, with its preset's batch size, optimiser and augmentation.

The floor is the same call's floating-point work done by dense matrix products alone:

- FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` around a separate run
  of the same call: every matmul and convolution that runs, forward and backward, a
  multiply-add counted as 2. So trained layers count forward + backward (about 3x forward;
  2x for the first layer, whose input needs no gradient) and frozen or no-grad passes
  (the evaluation passes, the frozen classifier of phase 1) forward only. Elementwise
  work (ReLU, dropout, batch norm, the optimiser) counts 0: it is overhead over the floor.
- MLP settings (every FLOP in a matmul): the floor is a *matmul chain*: every matrix product
  the call ran, recorded with its shapes and operand layouts, replayed with ``torch.mm``.
  The chain's FLOPs equal the counted ones (checked).
- Convnets: counted FLOPs at the GEMM rate measured in the same run (``torch.mm`` of two
  1024 x 1024 float32 matrices). They run on ``--batches`` training batches
  (``--vgg-batches`` for VGG16) and a
  validation subset of the same proportion) and the epoch time is scaled from them; the
  ratio needs no scaling (time and FLOPs are of the same subset).

Where the gap to the floor comes from: every convolution (forward and backward) and matrix
product the epoch ran is recorded with its shapes and strides and replayed alone on random
tensors ("kernels alone", the same FLOPs, checked). ``epoch / kernels alone`` is the loop's
own overhead (elementwise work, the optimiser, dropout masks, the data path);
``kernels alone / floor`` is how far the library's kernels for these shapes fall short of
the GEMM rate. ``--channels-last`` runs the loops with the pipeline's ``channels_last: true``
(the memory format question for the convnets); ``--threads`` sets torch's threads.

Times and the floor take turns, each the fastest of ``--repeats``.

    python benchmarks/training_floor.py --out benchmarks/results/training_floor.md
    python benchmarks/training_floor.py mnist_smallconv svhn_smallconv cifar10_vgg16 \
        --channels-last --out benchmarks/results/training_floor_channels_last.md
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import _bench
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from pipeline.augment import Augmentation
from pipeline.config import read_yaml
from pipeline.features import AugmentedTargets, FeatureDropoutTargets
from pipeline.losses import LOSSES, loss_kwargs
from pipeline.models import ConfidNetHead, build_classifier
from pipeline.prepared import Split
from pipeline.runtime import computing
from pipeline.settings import compose
from pipeline.training import ConfidenceData, fit_confidence, train_classifier

CPU = torch.device("cpu")
# dataset -> (input shape, classes, training images, validation images), the pipeline's
# splits (validation: 10% of the official training set)
SHAPES: dict[str, tuple[tuple[int, ...], int, int, int]] = {
    "mnist": ((1, 28, 28), 10, 54_000, 6_000),
    "svhn": ((3, 32, 32), 10, 65_932, 7_325),
    "cifar10": ((3, 32, 32), 10, 45_000, 5_000),
}
SETTINGS = ("mnist_mlp", "mnist_smallconv", "svhn_smallconv", "cifar10_vgg16")
QUICK_SETTINGS = ("mnist_mlp", "svhn_smallconv")  # the matmul-chain floor, the FLOPs floor
GOALS = {"mlp": 1.3}  # anything else (the convnets): 2.0
GEMM_SIZE = 1024

aten = torch.ops.aten
# the operands' positions in the matrix products' arguments
MATMULS = {aten.mm.default: (0, 1), aten.addmm.default: (1, 2)}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    stride: tuple[int, ...]


Call = tuple[Any, tuple[Any, ...]]  # an op and its arguments, tensors as TensorSpec


class KernelRecorder(TorchDispatchMode):
    """Records every convolution (forward and backward) and matrix product that runs: the
    op and its arguments, tensors as (shape, strides), so that a replay has the same
    memory formats (channels-last, transposed views)."""

    KERNELS = (aten.convolution.default, aten.convolution_backward.default, *MATMULS)

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Call] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        if func in self.KERNELS:
            assert not kwargs, (func, kwargs)
            self.calls.append((func, tuple(
                TensorSpec(tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else a
                for a in args)))
        return func(*args, **(kwargs or {}))


def random_like(spec: TensorSpec, cache: dict[TensorSpec, torch.Tensor]) -> torch.Tensor:
    """A random tensor of ``spec``'s shape and strides, one per spec in ``cache``."""
    if spec not in cache:
        size = 1 + sum((n - 1) * s for n, s in zip(spec.shape, spec.stride, strict=True))
        cache[spec] = torch.randn(size).as_strided(spec.shape, spec.stride)
    return cache[spec]


def chain(calls: list[Call]) -> tuple[Callable[[], None], int]:
    """The matrix products of ``calls`` replayed with ``torch.mm`` on random operands of
    the same layouts, and their FLOPs."""
    cache: dict[TensorSpec, torch.Tensor] = {}
    pairs = [(random_like(args[i], cache), random_like(args[j], cache))
             for func, args in calls if func in MATMULS for i, j in [MATMULS[func]]]
    flops = sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in pairs)

    def run() -> None:
        for a, b in pairs:
            torch.mm(a, b)

    return run, flops


def kernel_chain(calls: list[Call]) -> Callable[[], None]:
    """A replay of ``calls`` on random tensors of the same shapes and strides: what the
    loop's convolutions and matrix products cost alone, in the kernels the library picks
    for those shapes."""
    cache: dict[TensorSpec, torch.Tensor] = {}
    replay = [(func, [random_like(a, cache) if isinstance(a, TensorSpec) else a for a in args])
              for func, args in calls]

    def run() -> None:
        for func, args in replay:
            func(*args)

    return run


def gemm(repeat: int = 8) -> Callable[[], None]:
    a, b = torch.randn(GEMM_SIZE, GEMM_SIZE), torch.randn(GEMM_SIZE, GEMM_SIZE)

    def run() -> None:
        for _ in range(repeat):
            torch.mm(a, b)

    return run



@dataclass
class Loop:
    name: str  # classifier | phase 1 (path)
    run: Callable[[], Any]
    scale: float  # full epoch / measured subset


def loops(setting: str, batches: int | None, quick: bool) -> tuple[str, list[Loop]]:
    """The two epochs of ``setting``: classifier and phase 1, each a call of the real loop
    on ``batches`` training batches (all of them when None)."""
    params = read_yaml(compose([f"setting={setting}"]))
    shape, classes, n_train, n_val = SHAPES[params["dataset"]]
    cls_cfg, cfg = params["classifier"], params["confidnet"]
    if quick:  # two batches of 4
        cls_cfg, cfg = {**cls_cfg, "batch_size": 4}, {**cfg, "batch_size": 4}
        batches = 2
    n = n_train if batches is None else min(n_train, batches * cls_cfg["batch_size"])
    m = max(2, round(n * n_val / n_train))
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = build_classifier(shape, classes, cls_cfg)
    train = Split(torch.randn(n, *shape, generator=gen), torch.randint(0, classes, (n,),
                                                                       generator=gen))
    val = Split(torch.randn(m, *shape, generator=gen), torch.randint(0, classes, (m,),
                                                                     generator=gen))
    augment = Augmentation.from_params(cls_cfg["augmentation"], (0.0,) * shape[0])

    def classifier_epoch() -> Any:
        return train_classifier(model, train, val, {**cls_cfg, "epochs": 1}, CPU, 0,
                                log=lambda epoch, row: None,
                                augment=augment if augment.active else None)

    # phase 1 as stages/train_confidnet.py sets it up for confidnet.features=dropout
    model.eval()
    head = ConfidNetHead(model.feature_dim, cfg["width"], cfg["layers"])
    exact = not augment.active and model.dropout_only_on_features
    relabel = (FeatureDropoutTargets(model, params["criterion"]) if exact else
               AugmentedTargets(model, augment, params["criterion"], features=True,
                                dropout=True))
    features = torch.randn(n, model.feature_dim, generator=gen).relu()
    target = torch.rand(n, generator=gen)
    phase1_train = ConfidenceData(features if exact else train.x, target,
                                  (target > 0.1).long(), labels=train.y)
    val_target = torch.rand(m, generator=gen)
    phase1_val = ConfidenceData(torch.randn(m, model.feature_dim, generator=gen).relu(),
                                val_target, (val_target > 0.1).long())

    def phase1_epoch() -> Any:
        return fit_confidence(head, phase1_train, phase1_val, LOSSES[params["loss"]],
                              loss_kwargs(params), epochs=1, lr=cfg["lr"],
                              batch_size=cfg["batch_size"], device=CPU, seed=0,
                              log=lambda epoch, row: None, desc="phase 1", relabel=relabel)

    path = "cached features" if exact else "frozen forward"
    subset = (f"{n:,} of {n_train:,} images" if n < n_train else f"{n_train:,} images")
    return cls_cfg["model"], [
        Loop(f"classifier ({subset})", classifier_epoch, n_train / n),
        Loop(f"phase 1, {path} ({subset})", phase1_epoch, n_train / n)]


def count(fn: Callable[[], Any]) -> tuple[int, list[Call]]:
    """FLOPs of one call of ``fn`` and every kernel call it made (:class:`KernelRecorder`)."""
    with FlopCounterMode(display=False) as flops, KernelRecorder() as kernels:
        fn()
    return flops.get_total_flops(), kernels.calls


def measure(setting: str, loop: Loop, goal: float, gemm_run: Callable[[], None],
            gemm_flops: int, repeats: int) -> list[str]:
    """One row: ``loop``'s epoch against its floor, and against its own kernels replayed
    alone (:func:`kernel_chain`)."""
    flops, calls = count(loop.run)
    replay, chain_flops = chain(calls)
    matmul_only = chain_flops == flops
    kernels = kernel_chain(calls)
    assert count(kernels)[0] == flops, "the kernel replay misses FLOPs the loop ran"
    runs: dict[str, Callable[[], Any]] = {"epoch": loop.run, "gemm": gemm_run,
                                          "kernels": kernels}
    if matmul_only:
        runs["chain"] = replay
    t = _bench.interleaved(runs, repeats)
    rate = gemm_flops / t["gemm"]
    floor = t["chain"] if matmul_only else flops / rate
    how = "matmul chain" if matmul_only else f"FLOPs at {rate / 1e9:.0f} GFLOP/s"
    ratio = t["epoch"] / floor
    return [setting, loop.name, f"{flops * loop.scale / 1e9:,.0f}",
            f"{t['epoch'] * loop.scale:.2f}", f"{floor * loop.scale:.2f} ({how})",
            f"{flops / t['epoch'] / 1e9:.0f}", f"{rate / 1e9:.0f}",
            f"{t['kernels'] * loop.scale:.2f}", f"{t['epoch'] / t['kernels']:.2f}x",
            f"**{ratio:.2f}x**", f"{goal}x", "met" if ratio <= goal else "missed"]


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("settings", nargs="*", default=list(SETTINGS), help=f"from {SETTINGS}")
    p.add_argument("--batches", type=int, default=20,
                   help="training batches timed per SmallConvNet epoch (default 20); the MLP "
                        "runs whole epochs")
    p.add_argument("--vgg-batches", type=int, default=4,
                   help="training batches timed per VGG16 epoch (default 4)")
    p.add_argument("--channels-last", action="store_true",
                   help="run the loops with params' channels_last: true (images and "
                        "convolution weights in channels-last order)")
    args = p.parse_args()
    if args.quick and args.settings == list(SETTINGS):
        args.settings = list(QUICK_SETTINGS)
    report = _bench.Report("Epoch times against the arithmetic floor", args)
    gemm_repeat = 1 if args.quick else 8
    gemm_run = gemm(gemm_repeat)
    gemm_flops = gemm_repeat * 2 * GEMM_SIZE**3
    rows = []
    for setting in args.settings:
        model_name = read_yaml(compose([f"setting={setting}"]))["classifier"]["model"]
        batches = {"mlp": None, "vgg16": args.vgg_batches}.get(model_name, args.batches)
        model_name, setting_loops = loops(setting, batches, args.quick)
        goal = GOALS.get(model_name, 2.0)
        for loop in setting_loops:
            with computing(channels_last=args.channels_last):
                rows.append(measure(setting, loop, goal, gemm_run, gemm_flops, args.repeats))
            print(" | ".join(rows[-1]), file=sys.stderr, flush=True)  # progress
    report.add(_bench.table(HEADERS, rows))
    report.add(
        f"Epoch and floor in seconds per whole epoch (scaled from the subset where one is "
        f"named), GFLOP per epoch counted by FlopCounterMode (forward + backward of the "
        f"trained layers, forward of the frozen ones and of the evaluation passes). GEMM "
        f"rate: torch.mm of {GEMM_SIZE}x{GEMM_SIZE} float32 matrices in the same run. "
        f"Kernels alone: every convolution (forward, backward) and matrix product the "
        f"epoch ran, replayed with the same shapes and memory format on random tensors "
        f"(same FLOPs, checked): what the library's kernels for these shapes cost without "
        f"the loop around them; ratio = epoch / floor = (epoch / kernels alone) x "
        f"(kernels alone / floor). Memory format: "
        f"{'channels-last' if args.channels_last else 'contiguous (the default)'}. "
        f"Fastest of {args.repeats} interleaved repeats.")
    report.close()


HEADERS = ["setting", "epoch (data)", "GFLOP", "epoch, s", "floor, s", "achieved GFLOP/s",
           "GEMM GFLOP/s", "kernels alone, s", "epoch / kernels", "ratio", "goal", ""]


if __name__ == "__main__":
    main()
