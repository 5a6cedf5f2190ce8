"""Where and how a stage runs: the project root, the device and the seeds. Plumbing every
stage uses, kept apart from the science so that importing it pulls in nothing else."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def project_root() -> Path:
    """The DVC project root: ``DVC_ROOT`` inside DVC runs, else the working directory."""
    return Path(os.environ.get("DVC_ROOT") or Path.cwd()).resolve()


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; an explicit ``cuda`` without one is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device = {name!r} but CUDA is not available; use auto or cpu")
    return device


def seed_everything(seed: int, device: torch.device | None = None) -> None:
    """Seed Python, numpy and torch. On CUDA, also ask for deterministic kernels (CPU
    kernels of the ops used here already are; the switch costs ~2 s of imports)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if device is not None and device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
