"""One process of the DDP tests (tests/test_ddp.py), started by the real ``torchrun``:
``torchrun --standalone --nproc-per-node 2 tests/ddp_worker.py OUT``.

Every process joins the gloo group through ``pipeline.distributed.start``, as a training
stage does, then trains the tiny problems below with the project's own loops, and writes
what it ended with to ``OUT/<case>-rank<r>.pt``. The test trains the same problems in
one process and compares. Besides the correct runs, two deliberately broken variants
each break the gradient average once, from here (the library has no switch for it):

- ``classifier_summed``: a DDP communication hook that sums the processes' gradients
  instead of averaging them;
- ``classifier_unweighted``: each process's mean loss left unweighted, so a last batch
  shared unevenly averages the shares' means instead of the samples;
- ``confidence_local``: a hook that keeps each process's own gradient (no exchange).

The test imports the problems from here, so both sides train the very same ones.
"""


import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline import distributed
from pipeline.augment import Augmentation
from pipeline.checkpoint import Checkpointer
from pipeline.losses import LOSSES
from pipeline.models import MLP, ConfidNetHead
from pipeline.prepared import Split
from pipeline.training import ConfidenceData, FitResult, fit_confidence, train_classifier

CPU = torch.device("cpu")
SEED = 0
# 51 samples in batches of 16: 16, 16, 16, 3, so the last batch is shared 2 + 1.
CLASSIFIER_CFG = {"epochs": 3, "batch_size": 16, "lr": 0.1, "momentum": 0.9,
                  "weight_decay": 1e-4, "milestones": [2], "gamma": 0.5}
# 49 samples in batches of 16: the last batch has one sample, process 1 none.
CONFIDENCE_N, CONFIDENCE_EPOCHS, CONFIDENCE_BATCH = 49, 3, 16
# Resume: dropout and augmentation, so each process's own random streams matter.
RESUME_EPOCHS, RESUME_STOP = 4, 2
AUGMENT = Augmentation(hflip=True, pad_value=(0.0,))


def images(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, 1, 4, 4, generator=g), torch.randint(0, 4, (n,), generator=g))


TRAIN, VAL = images(51, 1), images(20, 2)


def confidence_data(n: int, seed: int) -> ConfidenceData:
    g = torch.Generator().manual_seed(seed)
    correct = (torch.arange(n) % 3 != 0).long()
    return ConfidenceData(torch.randn(n, 8, generator=g), torch.rand(n, generator=g), correct)


CONF_TRAIN, CONF_VAL = confidence_data(CONFIDENCE_N, 3), confidence_data(20, 4)


def ignore(epoch: int, row: dict[str, float]) -> None:
    """An epoch logger that keeps nothing (the history is in the result)."""


def fit_classifier(epochs: int = CLASSIFIER_CFG["epochs"], dropout: float = 0.0,
                   augment: Augmentation | None = None,
                   checkpointer: Checkpointer | None = None,
                   init_seed: int = 0) -> tuple[MLP, FitResult]:
    torch.manual_seed(init_seed)
    model = MLP((1, 4, 4), 4, hidden=12, dropout=dropout)
    result = train_classifier(model, TRAIN, VAL, {**CLASSIFIER_CFG, "epochs": epochs}, CPU,
                              SEED, ignore, checkpointer=checkpointer, augment=augment)
    return model, result


def fit_head() -> tuple[ConfidNetHead, FitResult]:
    torch.manual_seed(0)
    head = ConfidNetHead(8, width=10, layers=2)
    result = fit_confidence(head, CONF_TRAIN, CONF_VAL, LOSSES["mse"], {},
                            epochs=CONFIDENCE_EPOCHS, lr=1e-2, batch_size=CONFIDENCE_BATCH,
                            device=CPU, seed=SEED, log=ignore, desc="test")
    return head, result


def fit_resumable(checkpointer: Checkpointer | None, epochs: int = RESUME_EPOCHS,
                  init_seed: int = 0) -> tuple[MLP, FitResult]:
    return fit_classifier(epochs, dropout=0.3, augment=AUGMENT, checkpointer=checkpointer,
                          init_seed=init_seed)


# ------------------------------------------------------------- deliberately broken variants

Hook = Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]


def summed(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's all-reduce hook without its division by the number of processes."""
    work = dist.all_reduce(bucket.buffer(), async_op=True)
    assert work is not None
    return work.get_future().then(lambda fut: fut.value()[0])


def local(state: Any, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """No exchange: each process keeps its own gradient."""
    fut: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    fut.set_result(bucket.buffer())
    return fut


@contextmanager
def comm_hook(hook: Hook) -> Iterator[None]:
    """Every model the loops wrap in DDP meanwhile reduces its gradients with ``hook``."""
    wrap = distributed.wrap

    def hooked(*args: Any, **kwargs: Any) -> torch.nn.Module:
        model = wrap(*args, **kwargs)
        model.register_comm_hook(None, hook)
        return model

    distributed.wrap = hooked  # type: ignore[assignment]
    try:
        yield
    finally:
        distributed.wrap = wrap  # type: ignore[assignment]


@contextmanager
def unweighted_shares() -> Iterator[None]:
    """Each process's mean loss weighted 1 (0 for an empty share): the mean of the
    shares' means instead of the mean over the batch's samples."""
    share = distributed.share

    def unweighted(batch: torch.Tensor, here: distributed.Group) -> tuple[torch.Tensor, float]:
        mine, weight = share(batch, here)
        return mine, float(weight > 0)

    distributed.share = unweighted  # type: ignore[assignment]
    try:
        yield
    finally:
        distributed.share = share  # type: ignore[assignment]


# ------------------------------------------------------------------------------------ main


def save(out: Path, case: str, fit: tuple[torch.nn.Module, FitResult]) -> None:
    model, result = fit
    torch.save({"state": model.state_dict(), "history": result.history,
                "best_epoch": result.best_epoch},
               out / f"{case}-rank{distributed.group().rank}.pt")


def main(out: Path) -> None:
    here = distributed.start("ddp_worker", CPU, nproc_per_node=2, distributed=True)
    assert here.size == 2, here
    save(out, "classifier", fit_classifier())
    with comm_hook(summed):
        save(out, "classifier_summed", fit_classifier())
    with unweighted_shares():
        save(out, "classifier_unweighted", fit_classifier())
    save(out, "confidence", fit_head())
    with comm_hook(local):
        save(out, "confidence_local", fit_head())

    # Resume: a run stopped after RESUME_STOP epochs, resumed by fresh models (another
    # initialisation) to RESUME_EPOCHS, against one never stopped. Each process gets a
    # checkpoint folder of its own: process 0 must write its one, the others none.
    save(out, "uninterrupted", fit_resumable(None))
    folder = out / f"checkpoints-rank{here.rank}"
    fit_resumable(Checkpointer("stage", "fp", root=folder), epochs=RESUME_STOP)
    save(out, "resumed", fit_resumable(Checkpointer("stage", "fp", root=folder), init_seed=7))
    distributed.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
