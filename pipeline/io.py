"""Atomic file writes: a stage killed mid-write never leaves a file that looks complete."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.replace(path)
    finally:
        tmp_path.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_write_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]  # numpy's stub: any key could be allow_pickle


def atomic_torch_save(path: Path, obj: Any) -> None:
    """``torch.save(obj)`` to ``path``, atomically; the same tensors give the same bytes
    (the weights in ``models/`` are DVC outputs, hashed into ``dvc.lock``). Written through
    a file object on purpose: given a path, torch names the zip archive's root folder after
    the file, here a random temporary name. torch's other records (``serialization_id``:
    CRC32s of the records and a hash of their names) depend on the content only."""
    import torch

    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        torch.save(obj, handle)


def read_json(path: Path | str) -> Any:
    """A JSON file: the one reader of the stages' JSON outputs (``pipeline.prepared``
    wraps it to name the file in a :class:`~pipeline.errors.DataError`)."""
    return json.loads(Path(path).read_text())


def load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def rows_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV text of dict rows (header from the first row), floats to 6 significant digits."""
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    return buffer.getvalue()


def history_csv(history: Sequence[Mapping[str, float]]) -> str:
    """Per-epoch curves; rows may lack keys (epoch 0 has no training loss)."""
    fields: list[str] = []
    for row in history:
        fields += [k for k in row if k not in fields]
    return rows_csv([{k: row.get(k, "") for k in fields} for row in history])
