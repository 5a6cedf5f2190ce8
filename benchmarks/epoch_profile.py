"""Where an MLP epoch's time goes beyond its matrix products, and what the optimiser's
implementation would change, measured in one run.

The loops are ``training_floor.py``'s own (``pipeline.training.train_classifier`` and
``fit_confidence`` in the authors' phase 1, on synthetic data of the setting's shapes, on
``--batches`` training batches). Two tables:

1. ``torch.profiler``: each loop's share of self CPU time in matrix products, the
   optimiser step, the dropout masks (``bernoulli_``), the batch gather and the rest.
2. torch.optim's implementations, each loop run with torch's default (a Python loop over
   the parameters on the CPU), ``foreach=True`` and ``fused=True``, interleaved with the
   matmul-chain floor of the same call, in CPU seconds (``time.process_time``: a busy
   machine disturbs it less than wall time). The pipeline uses ``foreach``: the same bits
   on the CPU as the default, and faster where parameters are small (the digits default);
   ``fused`` rounds differently (other weights, another digits headline).

    OMP_NUM_THREADS=1 python benchmarks/epoch_profile.py --out epoch_profile.md
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import _bench
import torch
import training_floor
from torch.profiler import ProfilerActivity, profile

# profiler keys of each share (self CPU time; the optimiser step's total, children included)
SHARES = {"matrix products": ("aten::mm", "aten::addmm"),
          "dropout masks": ("aten::bernoulli_",), "batch gather": ("aten::index",)}
OPTIMISER_STEP = "Optimizer.step"
# torch's default on the CPU is the Python loop (foreach=False); the pipeline asks foreach
VARIANTS: dict[str, dict[str, bool]] = {"default": {"foreach": False},
                                        "foreach": {"foreach": True},
                                        "fused": {"foreach": False, "fused": True}}


@contextmanager
def optimisers(options: dict[str, bool]) -> Iterator[None]:
    """torch.optim.SGD and Adam, as the pipeline's loops create them, with ``options``
    in place of the pipeline's own (``foreach=True``)."""
    originals = {name: getattr(torch.optim, name) for name in ("SGD", "Adam")}

    def forced(cls: type[torch.optim.Optimizer]) -> Callable[..., torch.optim.Optimizer]:
        return lambda *args, **kwargs: cls(*args, **{**kwargs, **options})

    for name, cls in originals.items():
        setattr(torch.optim, name, forced(cls))
    try:
        yield
    finally:
        for name, cls in originals.items():
            setattr(torch.optim, name, cls)


def shares(run: Callable[[], Any]) -> list[str]:
    """Percent of self CPU time per :data:`SHARES` group, the optimiser step and the rest."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    parts = {name: sum(e.self_cpu_time_total for e in events if e.key in keys)
             for name, keys in SHARES.items()}
    parts["optimiser step"] = sum(e.cpu_time_total for e in events
                                  if e.key.startswith(OPTIMISER_STEP))
    parts["rest"] = total - sum(parts.values())
    return [f"{100 * value / total:.0f}%" for value in parts.values()]


def main() -> None:
    p = _bench.parser(__doc__.splitlines()[0], repeats=3)
    p.add_argument("--setting", default="mnist_mlp", help="an MLP setting (default mnist_mlp)")
    p.add_argument("--batches", type=int, default=100,
                   help="training batches per timed epoch (default 100)")
    args = p.parse_args()
    report = _bench.Report("Where an MLP epoch's time goes", args)
    _, loops = training_floor.loops(args.setting, args.batches, args.quick)
    share_rows, variant_rows = [], []
    for loop in loops:
        loop.run()  # warm-up
        share_rows.append([loop.name, *shares(loop.run)])
        flops, calls = training_floor.count(loop.run)
        floor, chain_flops = training_floor.chain(calls)
        assert chain_flops == flops, "not an MLP setting: its floor is not a matmul chain"
        best = dict.fromkeys([*VARIANTS, "floor"], float("inf"))
        for _ in range(args.repeats):
            for name, options in VARIANTS.items():
                with optimisers(options):
                    start = time.process_time()
                    loop.run()
                    best[name] = min(best[name], time.process_time() - start)
            start = time.process_time()
            floor()
            best["floor"] = min(best["floor"], time.process_time() - start)
        variant_rows += [[loop.name, name, f"{best[name]:.2f}", f"{best['floor']:.2f}",
                          f"**{best[name] / best['floor']:.2f}x**"] for name in VARIANTS]
    report.add(_bench.table(["epoch", *SHARES, "optimiser step", "rest"], share_rows))
    report.add("Share of self CPU time (torch.profiler) of one epoch on the batches named; "
               "the optimiser step with everything it runs.")
    report.add(_bench.table(["epoch", "torch.optim", "epoch, CPU s", "floor, CPU s", "ratio"],
                            variant_rows))
    report.add(f"CPU seconds (process time), fastest of {args.repeats} interleaved repeats; "
               "floor: the same call's matrix products replayed with torch.mm "
               "(training_floor.py).")
    report.close()


if __name__ == "__main__":
    main()
