"""The one reader of ``dvc.yaml`` and ``dvc.lock``, and the one dotted-key lookup into
params (``classifier.lr``, as both files name params)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

# What ``lookup`` returns for an absent key when asked to: distinct from a null value.
MISSING: Any = object()
_REQUIRED: Any = object()


def read_yaml(text: str) -> Any:
    """YAML as DVC reads it. YAML 1.1 (PyYAML) reads ``1e-06`` (no dot) as a string; DVC
    writes numbers that way after ``dvc exp run -S lr=1e-6``. omegaconf's loader (the one
    Hydra composes ``params.yaml`` with) resolves every decimal or scientific literal as a
    float, as YAML 1.2 does. Interpolations (``${...}``) are left as written."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(text), resolve=False)


def stages(path: Path = Path("dvc.yaml")) -> dict[str, dict[str, Any]]:
    """The stages of a ``dvc.yaml`` by name, in the file's order."""
    return dict(yaml.safe_load(Path(path).read_text())["stages"])


def paths(stage: Mapping[str, Any], *sections: str) -> list[Path]:
    """The paths a stage lists under ``sections`` (``deps``, ``outs``, ``metrics``,
    ``plots``): plain entries and the keys of ``{path: options}`` entries."""
    found = []
    for section in sections:
        for entry in stage.get(section, []):
            found += [Path(name) for name in entry] if isinstance(entry, dict) else [Path(entry)]
    return found


def locked_params(lock_path: Path = Path("dvc.lock")) -> dict[str, dict[str, Any]]:
    """Per stage, the ``params.yaml`` values ``dvc.lock`` recorded (dotted keys); empty
    without a lock file."""
    if not lock_path.exists():
        return {}
    lock = read_yaml(lock_path.read_text())["stages"]
    return {name: dict(stage.get("params", {}).get("params.yaml", {}))
            for name, stage in lock.items()}


def lookup(params: Mapping[str, Any], dotted: str, default: Any = _REQUIRED) -> Any:
    """``params['a']['b']`` for ``'a.b'``; ``default`` where a key is absent (KeyError
    when no default is given)."""
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is _REQUIRED:
                raise KeyError(dotted)
            return default
        node = node[part]
    return node
