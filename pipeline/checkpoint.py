"""Per-epoch checkpoints of a training stage, so a killed stage resumes instead of
starting over.

A checkpoint lives in ``.checkpoints/<stage>/`` under the working directory, outside every
DVC output (DVC runs a stage in the project, or in the experiment's own copy of it, so
queued experiments never share one). It holds the whole training state and a fingerprint
of what the run depends on: the stage's params and the content of its deps, both as
``dvc.yaml`` declares them. A checkpoint with another fingerprint is discarded, never
resumed. The stage removes its checkpoints once its outputs are written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from pipeline import dvcfile
from pipeline.io import atomic_torch_save

ROOT = Path(".checkpoints")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(stage: str, params: Mapping[str, Any], inputs: Iterable[Path | str]) -> str:
    """sha256 of the stage name, ``params`` and the content of ``inputs`` (files, or
    folders hashed file by file; a missing input counts as such)."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"stage": stage, "params": params}, sort_keys=True,
                             default=str).encode())
    for item in inputs:
        path = Path(item)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        digest.update(f"\0input {path.as_posix()}\0".encode())
        for file in files:
            name = file.relative_to(path).as_posix() if file != path else ""
            content = _file_digest(file) if file.is_file() else "missing"
            digest.update(f"{name}\0{content}\0".encode())
    return digest.hexdigest()


def stage_fingerprint(stage: str, params: Mapping[str, Any],
                      dvc_yaml: Path = Path("dvc.yaml")) -> str:
    """The fingerprint of ``stage`` from its ``dvc.yaml`` entry: the params it declares
    (read from the validated ``params``) and its deps, code and data alike."""
    spec = dvcfile.stages(dvc_yaml)[stage]
    declared: dict[str, Any] = {}
    inputs: list[Path] = dvcfile.paths(spec, "deps")
    for entry in spec.get("params", []):
        if isinstance(entry, str):
            declared[entry] = dvcfile.lookup(params, entry)
        else:  # {file: keys}: depend on the whole file
            inputs += [Path(name) for name in entry]
    return fingerprint(stage, declared, inputs)


class Checkpointer:
    """Checkpoints of one training run, in ``root / stage``."""

    def __init__(self, stage: str, fingerprint: str, root: Path = ROOT,
                 every_seconds: float = 0.0) -> None:
        self.stage = stage
        self.fingerprint = fingerprint
        self.folder = Path(root) / stage
        self.path = self.folder / "checkpoint.pt"
        self.every_seconds = every_seconds
        self._last_save = time.monotonic()

    @classmethod
    def for_stage(cls, stage: str, params: Mapping[str, Any]) -> Checkpointer:
        """The checkpointer of a DVC stage, saving at most every
        ``params['checkpoint_every_seconds']`` seconds."""
        return cls(stage, stage_fingerprint(stage, params),
                   every_seconds=params["checkpoint_every_seconds"])

    def due(self) -> bool:
        """Whether an epoch that just ended should be saved: writing a large state every
        few milliseconds would cost more than the epochs it protects."""
        return time.monotonic() - self._last_save >= self.every_seconds

    def save(self, epoch: int, state: Mapping[str, Any]) -> None:
        """Replace the checkpoint with ``state`` after ``epoch`` (atomically). ``state``
        must load with ``weights_only=True``: tensors, containers, numbers, strings."""
        atomic_torch_save(self.path, {"fingerprint": self.fingerprint, "epoch": epoch,
                                      "state": dict(state)})
        self._last_save = time.monotonic()

    def load(self) -> tuple[int, dict[str, Any]] | None:
        """``(epoch, state)`` of the last checkpoint of this very run, else None (a
        checkpoint of other params or inputs, or an unreadable one, is discarded)."""
        if not self.path.exists():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
            epoch, state, found = saved["epoch"], saved["state"], saved["fingerprint"]
        except Exception as error:  # noqa: BLE001  any unreadable file is discarded, never fatal
            self._discard(f"it cannot be read ({type(error).__name__}: {error})")
            return None
        if found != self.fingerprint:
            self._discard("it was made with other params or inputs")
            return None
        return int(epoch), state

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _discard(self, why: str) -> None:
        sys.stderr.write(f"{self.stage}: discarding the checkpoint in {self.folder}: {why}\n")
        self.clear()
