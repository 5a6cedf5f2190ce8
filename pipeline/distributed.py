"""Training on several processes (GPUs) with ``torchrun`` and PyTorch's
DistributedDataParallel (DDP). Plumbing: what the training loops and stages ask of a
process group, and nothing when there is none.

Who runs: ``torchrun`` starts the processes and sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in each; a training stage started that way (``torchrun --nproc-per-node 4
-m stages.train_classifier``) joins the group (NCCL on CUDA, gloo on the CPU), process
``r`` on GPU ``LOCAL_RANK``. A training stage started plainly, as ``dvc repro`` does, with
``nproc_per_node`` above 1 in ``params.yaml`` starts itself again under torchrun
(:func:`relaunch`): ``dvc.yaml`` runs the same command for one process or many. Only the
training stages (classifier, ConfidNet phase 1, fine-tuning) take part; every other stage
refuses a group of more than one process (:func:`start`).

What each process does: every process draws the same batch order, the one a single
process draws, and takes its contiguous share of each global batch of ``batch_size``
samples (:func:`share`); DDP averages the gradients. Each share's mean loss is weighted by
its size, so the averaged gradient is that of the whole batch's mean loss, as in one
process, for every loss that is a mean over samples (cross-entropy, ``mse``, ``bce``,
``focal``). The ``ranking`` loss compares pairs inside a batch: under DDP each process
ranks the pairs of its share only. Batch-norm layers in training mode (the classifier of
the SVHN and VGG16 settings) use the statistics of the whole batch on CUDA
(``SyncBatchNorm``); on the CPU, where PyTorch has no synchronised batch-norm, those of
each share. Validation and the epoch's training accuracy are computed by every process on
its share of the rows and gathered (:func:`gather_rows`), so all processes keep the same
best epoch.

Seeding, so a run is repeatable for a given number of processes: with one process nothing
changes (one generator seeded with ``seed`` draws the batch order, augmentations and
dropout masks of targets recomputed per batch; torch's global generator, seeded with
``seed`` by the stage, draws the model's dropout masks). With ``N > 1`` processes, the
batch-order generator is seeded with ``seed`` in every process; process ``r`` draws its
augmentations from a generator of its own and reseeds torch's global generator, with
seeds derived from ``(seed, r)`` by numpy's ``SeedSequence`` (:func:`process_seed`), so
shares never see the same random draws. The model starts from process 0's
initialisation (DDP broadcasts it), which is the one-process initialisation. A checkpoint
holds every process's generators and is resumed only by the same number of processes.

Who writes: only process 0 writes outputs, checkpoints and the MLflow run; the others
stop once training ends.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

# Set by torchrun in every process it starts.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")

# SeedSequence spawn keys: the purposes a process derives a seed for.
TORCH_GLOBAL, SAMPLE_DRAWS = 0, 1


@dataclass(frozen=True)
class Group:
    """This process's place among the training processes: ``rank`` of ``size``."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Process 0: the one that logs, saves checkpoints and writes the outputs."""
        return self.rank == 0


def group() -> Group:
    """The process group this process belongs to; ``Group()`` (one process) when none."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    return Group()


def is_main() -> bool:
    return group().main


def torchrun_env(environ: Mapping[str, str] = os.environ) -> tuple[int, int, int] | None:
    """``(rank, world size, local rank)`` set by torchrun, or None outside torchrun."""
    if not all(name in environ for name in TORCHRUN_VARIABLES):
        return None
    return tuple(int(environ[name]) for name in TORCHRUN_VARIABLES)  # type: ignore[return-value]


def torchrun_command(module: str, nproc_per_node: int) -> list[str]:
    """The command that runs ``python -m module`` as ``nproc_per_node`` processes on this
    machine: torchrun (``torch.distributed.run``) of this interpreter, with a rendezvous
    of its own on a free local port (``--standalone``), so that experiments running side
    by side do not meet."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc_per_node}", "-m", module]


def relaunch(module: str, nproc_per_node: int) -> None:
    """Replace this process with ``nproc_per_node`` processes of ``python -m module``
    under torchrun, when asked for more than one and not already under torchrun (returns
    otherwise). The exit status is torchrun's: that of the first process to fail."""
    if nproc_per_node <= 1 or torchrun_env() is not None:
        return
    command = torchrun_command(module, nproc_per_node)
    sys.stderr.write(f"nproc_per_node = {nproc_per_node}: running {module} under torchrun "
                     f"({' '.join(command[1:])})\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os.execv(sys.executable, command)


def start(stage: str, device: torch.device | None, nproc_per_node: int,
          distributed: bool) -> Group:
    """Join the process group torchrun describes, if it has more than one process:
    NCCL on CUDA (process ``r`` on GPU ``LOCAL_RANK``), gloo on the CPU. A stage that is
    not ``distributed`` refuses more than one process (``device`` is None for a stage
    without torch, never distributed). Errors (``RuntimeError``) name the bad value and
    what would work."""
    env = torchrun_env()
    if env is None or env[1] == 1:
        return Group()
    rank, size, local_rank = env
    if not distributed:
        raise RuntimeError(f"stage {stage!r} runs in one process (WORLD_SIZE = {size}); only "
                           "train_classifier, train_confidnet and finetune train on several; "
                           "run it without torchrun")
    if device is None:
        raise ValueError(f"stage {stage!r} trains on several processes but names no device")
    import torch
    import torch.distributed as dist

    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
    if local_size != nproc_per_node and rank == 0:
        sys.stderr.write(f"warning: torchrun started {local_size} processes per node but "
                         f"params.yaml has nproc_per_node = {nproc_per_node}; dvc.lock "
                         "records the params, not the launch\n")
    if device.type == "cuda":
        if device.index is not None:
            raise RuntimeError(f"device = 'cuda:{device.index}' puts every process on one "
                               "GPU; use device = cuda or auto with several processes")
        if local_size > torch.cuda.device_count():
            raise RuntimeError(f"{local_size} processes per node but "
                               f"{torch.cuda.device_count()} GPUs; set nproc_per_node to at "
                               "most the number of GPUs")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return group()


def stop() -> None:
    """Leave the process group, if any (there is none before torch.distributed is
    imported: a stage without torch does not import it here)."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def process_seed(seed: int, purpose: int, rank: int) -> int:
    """A 64-bit seed for ``purpose`` (:data:`TORCH_GLOBAL`, :data:`SAMPLE_DRAWS`) in
    process ``rank``, derived from ``seed`` by numpy's ``SeedSequence``: independent
    streams for every process and purpose, the same ones on every run."""
    import numpy as np

    sequence = np.random.SeedSequence(seed, spawn_key=(purpose, rank))
    return int(sequence.generate_state(1, dtype=np.uint64)[0])


def generators(seed: int) -> tuple[torch.Generator, torch.Generator]:
    """``(batch order, sample draws)`` for a training loop (see the module docstring).
    One process: one generator seeded with ``seed`` for both. Several: the batch order
    from ``seed`` in every process; the draws from a generator of this process's own, and
    torch's global generator reseeded for this process."""
    import torch

    order = torch.Generator().manual_seed(seed)
    here = group()
    if here.size == 1:
        return order, order
    torch.manual_seed(process_seed(seed, TORCH_GLOBAL, here.rank))
    return order, torch.Generator().manual_seed(process_seed(seed, SAMPLE_DRAWS, here.rank))


def share(batch: torch.Tensor, here: Group) -> tuple[torch.Tensor, float]:
    """Process ``here.rank``'s contiguous share of a global batch of sample indices, and
    the weight of that share's mean loss: ``len(share) * size / len(batch)``, so that
    DDP's average of the weighted gradients is the gradient of the whole batch's mean.
    A process left without a sample (a last batch smaller than the group) takes the
    batch's first sample with weight 0: every process must run forward and backward for
    DDP to average."""
    import torch

    if here.size == 1:
        return batch, 1.0
    mine = torch.tensor_split(batch, here.size)[here.rank]
    if len(mine) == 0:
        return batch[:1], 0.0
    return mine, len(mine) * here.size / len(batch)


def rows(n: int, here: Group) -> slice:
    """The contiguous rows of ``n`` that process ``here.rank`` predicts (as
    :func:`share` splits a batch, so shares differ by one row at most)."""
    base, extra = divmod(n, here.size)
    begin = here.rank * base + min(here.rank, extra)
    return slice(begin, begin + base + (here.rank < extra))


def _communication_device() -> torch.device:
    """Where collective tensors live: the process's GPU for NCCL, else the CPU."""
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(mine: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` rows every process computed its :func:`rows` of, in order, on the CPU
    (a collective: every process calls it)."""
    import torch
    import torch.distributed as dist

    here = group()
    if here.size == 1:
        return mine
    sizes = [len(range(n)[rows(n, Group(r, here.size))]) for r in range(here.size)]
    device = _communication_device()
    padded = torch.zeros((max(sizes), *mine.shape[1:]), dtype=mine.dtype, device=device)
    padded[:len(mine)] = mine.to(device)
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)]).cpu()


def sum_over_processes(value: float) -> float:
    """``value`` summed over the processes (a collective); ``value`` for one process."""
    import torch
    import torch.distributed as dist

    if group().size == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=_communication_device())
    dist.all_reduce(total)
    return float(total.item())


def broadcast(value: Any) -> Any:
    """Process 0's ``value`` (any picklable object), in every process (a collective)."""
    import torch.distributed as dist

    if group().size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every process's ``value`` (picklable), by rank, in every process (a collective)."""
    import torch.distributed as dist

    here = group()
    if here.size == 1:
        return [value]
    found: list[Any] = [None] * here.size
    dist.all_gather_object(found, value)
    return found


def wrap(model: nn.Module, device: torch.device, sync_batchnorm: bool = False,
         static_graph: bool = False) -> nn.Module:
    """``model`` for training: itself for one process, else in DDP (its parameters and
    buffers broadcast from process 0, its gradients averaged on every backward). With
    ``sync_batchnorm`` on CUDA, batch-norm layers are converted in place to
    ``SyncBatchNorm`` (same parameters and state dict). ``static_graph`` for a model
    whose forward leaves some parameters unused, the same ones at every step
    (fine-tuning's encoder copy keeps the classifier's last layer): DDP finds them on the
    first step and they keep no gradient, as with one process (unlike
    ``find_unused_parameters``, no search at every step and no warning when there are
    none)."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    if group().size == 1:
        return model
    if sync_batchnorm and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [torch.cuda.current_device()] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, static_graph=static_graph)
