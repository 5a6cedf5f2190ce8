"""Where and how a stage runs: the project root, the device, the seeds and how forward
passes run there (number and memory format). Plumbing every stage uses, kept apart from
the science so that importing it pulls in nothing else."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args

if TYPE_CHECKING:
    import torch
    from torch import nn


SWITCH_VALUES = {"on": True, "off": False}


def switch_on(name: str, environ: Mapping[str, str] = os.environ) -> bool:
    """An on/off environment switch (``CONFIDNET_TRACKING``, ``CONFIDNET_WARM``): ``on``
    (the default, also when unset or empty) or ``off``, in any case. Any other value is a
    ``ValueError`` naming it and the valid ones."""
    value = environ.get(name) or "on"
    try:
        return SWITCH_VALUES[value.strip().lower()]
    except KeyError:
        raise ValueError(f"{name}={value!r} is not a valid value; use one of: "
                         f"{', '.join(SWITCH_VALUES)}") from None


def project_root() -> Path:
    """The DVC project root: ``DVC_ROOT`` inside DVC runs, else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def check_device(name: str) -> None:
    """Raise ``RuntimeError`` when ``name`` (params' ``device``) asks for CUDA and there is
    none. ``auto`` and ``cpu`` run anywhere: they are passed without importing torch
    (seconds), which only knows whether CUDA is there."""
    if name in ("auto", "cpu"):
        return
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError(f"device = {name!r} but CUDA is not available; use auto or cpu")


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; an explicit ``cuda`` without one is an error."""
    import torch

    check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_host(seed: int) -> None:
    """Seed Python's and numpy's global generators (what a stage without torch uses)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed)


def seed_everything(seed: int, device: torch.device | None = None) -> None:
    """Seed Python, numpy and torch. On CUDA, also ask for deterministic kernels (CPU
    kernels of the ops used here already are; the switch costs ~2 s of imports)."""
    import torch

    seed_host(seed)
    torch.manual_seed(seed)
    if device is not None and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


# ------------------------------------------------------------------ how forward passes run

ModuleT = TypeVar("ModuleT", bound="nn.Module")

# ``precision`` in params.yaml: fp32 (the default: the paper's arithmetic) or bf16 (forward
# passes under torch.autocast in bfloat16; weights, gradients, optimiser state, losses and
# the criterion's targets stay float32 or wider).
Precision = Literal["fp32", "bf16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)


@dataclass(frozen=True)
class Compute:
    """How a stage's forward passes run on its device: the number format (``precision``)
    and the memory format of images and convolution weights (``channels_last``). Set once
    per stage with :func:`computing`, read where the loops run a model, like the autocast
    state it carries: the loops' signatures stay ``(..., device)``."""

    precision: str = "fp32"
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision = {self.precision!r}: valid values: "
                             f"{', '.join(PRECISIONS)}")

    def autocast(self, device: torch.device | str) -> AbstractContextManager[Any]:
        """The context of one forward pass: bf16 autocast on ``device``'s type, or none."""
        if self.precision == "fp32":
            return nullcontext()
        import torch

        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)

    def place(self, tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
        """``tensor`` on ``device`` (itself if already there), images (4-D) in channels-last
        order when asked. Called once per stage on whole splits, not per batch."""
        import torch

        moved = tensor.to(device)
        if self.channels_last and moved.dim() == 4:
            moved = moved.contiguous(memory_format=torch.channels_last)
        return moved

    def prepare(self, model: ModuleT, device: torch.device | str) -> ModuleT:
        """``model`` moved to ``device`` in place, its 4-D (convolution) weights channels-last
        when asked; returns it."""
        import torch

        model.to(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        return model


# a frozen dataclass: the shared default cannot be mutated
_COMPUTE: ContextVar[Compute] = ContextVar("compute", default=Compute())  # noqa: B039


def compute() -> Compute:
    """The :class:`Compute` in force (``Compute()``: fp32, contiguous, outside
    :func:`computing`)."""
    return _COMPUTE.get()


@contextmanager
def computing(precision: str = "fp32", channels_last: bool = False) -> Iterator[Compute]:
    """Run the forward passes inside the block with ``precision`` and ``channels_last``
    (params.yaml's keys; a stage wraps its work in ``computing(**compute_params(params))``)."""
    token = _COMPUTE.set(Compute(precision, channels_last))
    try:
        yield _COMPUTE.get()
    finally:
        _COMPUTE.reset(token)


def compute_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of params.yaml that :func:`computing` takes."""
    return {"precision": params["precision"], "channels_last": params["channels_last"]}
