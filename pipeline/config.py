"""``params.yaml``: loading and validation before any stage does work.

Every key is checked (type, range, allowed values; unknown keys get a did-you-mean), and
all problems are reported at once, each naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.dvcfile import read_yaml
from pipeline.errors import ParamsError
from pipeline.runtime import project_root  # noqa: F401  (re-exported: it lived here)


@dataclass(frozen=True)
class Spec:
    """One leaf of the schema."""

    kind: type | tuple[type, ...]
    minimum: float | None = None
    maximum: float | None = None
    min_exclusive: bool = False
    choices: Callable[[], list[str]] | None = None
    pattern_help: str | None = None
    validator: Callable[[Any], bool] | None = None
    nullable: bool = False

    def problem(self, value: Any) -> str | None:
        if value is None and self.nullable:
            return None
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        if isinstance(value, bool) and bool not in kinds:
            return f"must be {self._kind_name()}, not a boolean"
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kinds):
            return f"must be {self._kind_name()}, got {type(value).__name__}"
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        if self.choices is not None and value not in self.choices():
            return f"valid values: {', '.join(self.choices())}"
        if self.validator is not None and not self.validator(value):
            return f"valid values: {self.pattern_help}"
        if not isinstance(value, (int, float)):  # ranges bound numbers only
            return None
        if self.minimum is not None:
            if self.min_exclusive and value <= self.minimum:
                return f"must be > {self.minimum}"
            if not self.min_exclusive and value < self.minimum:
                return f"must be >= {self.minimum}"
        if self.maximum is not None and value > self.maximum:
            return f"must be <= {self.maximum}"
        return None

    def _kind_name(self) -> str:
        kinds = self.kind if isinstance(self.kind, tuple) else (self.kind,)
        names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
                 list: "a list", dict: "a mapping"}
        text = " or ".join(names.get(k, k.__name__) for k in kinds)
        return f"{text} or null" if self.nullable else text


def _registry_attribute(module: str, attribute: str) -> Any:
    """``module.attribute``, imported when validation reads it. On purpose not a static
    import: the registries hold what params may *name*, while config is plumbing every
    stage runs, and must not pull the science modules into every stage (and its ``dvc.yaml``
    deps). A stage that uses a registry imports it, and its deps list it."""
    import importlib

    return getattr(importlib.import_module(module), attribute)


def _registry_names(module: str, attribute: str) -> Callable[[], list[str]]:
    def names() -> list[str]:
        return list(_registry_attribute(module, attribute).names())

    return names


def _is_device(value: str) -> bool:
    if value in ("auto", "cpu", "cuda"):
        return True
    head, _, index = value.partition(":")
    return head == "cuda" and index.isdigit()


def _preset_names(group: str) -> Callable[[], list[str]]:
    def names() -> list[str]:
        from pipeline.settings import preset_names

        return preset_names(group)

    return names


def _is_milestones(value: list[Any]) -> bool:
    ints = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    return ints and list(value) == sorted(set(value))


def _is_checksum_map(value: dict[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{32}", v)
               for k, v in value.items())


def positive_int(maximum: float | None = None) -> Spec:
    return Spec(int, minimum=1, maximum=maximum)


def non_negative_int() -> Spec:
    return Spec(int, minimum=0)


def positive_float() -> Spec:
    return Spec(float, minimum=0.0, min_exclusive=True)


def fraction() -> Spec:
    return Spec(float, minimum=0.0, maximum=1.0, min_exclusive=True)


# How ConfidNet phase 1 sees the training images: through the frozen classifier with its
# dropout active, as the authors' learner does; in eval mode, batch by batch; or as features
# cached once by extract_features (see stages/train_confidnet.py).
CONFIDNET_FEATURES = ("dropout", "no_dropout", "cached")

SCHEMA: dict[str, Any] = {
    "setting": Spec(str, choices=_preset_names("setting")),
    "budget": Spec(str, choices=_preset_names("budget")),
    "seed": non_negative_int(),
    "dataset": Spec(str, choices=_registry_names("pipeline.data", "DATASETS")),
    "loss": Spec(str, choices=_registry_names("pipeline.losses", "LOSSES")),
    "criterion": Spec(str, choices=_registry_names("pipeline.losses", "CRITERIA")),
    "device": Spec(str, validator=_is_device, pattern_help="auto, cpu, cuda, cuda:N"),
    "checkpoint_every_seconds": Spec(float, minimum=0.0),
    "data": {
        "test_fraction": Spec(float, minimum=0.0, maximum=0.9, min_exclusive=True),
        "val_fraction": Spec(float, minimum=0.0, maximum=0.9, min_exclusive=True),
        "split_seed": Spec(int, minimum=0, nullable=True),
        "mirror": Spec(str),
        "checksums": Spec(dict, validator=_is_checksum_map,
                          pattern_help="a mapping of archive file name to its 32-hex MD5"),
    },
    "classifier": {
        "model": Spec(str, choices=_registry_names("pipeline.models", "MODELS")),
        "hidden": positive_int(),
        "dropout": Spec(float, minimum=0.0, maximum=0.95),
        "epochs": positive_int(),
        "batch_size": positive_int(),
        "lr": positive_float(),
        "momentum": Spec(float, minimum=0.0, maximum=1.0),
        "weight_decay": Spec(float, minimum=0.0),
        "milestones": Spec(list, validator=_is_milestones,
                           pattern_help="increasing positive epoch numbers, e.g. [90, 135]"),
        "gamma": fraction(),
        "augmentation": {
            "hflip": Spec(bool),
            "rotate_degrees": Spec(float, minimum=0.0, maximum=180.0),
            "crop_padding": non_negative_int(),
        },
    },
    "confidnet": {
        "width": positive_int(),
        "layers": positive_int(),
        "epochs": positive_int(),
        "batch_size": positive_int(),
        "lr": positive_float(),
        "focal_alpha": fraction(),
        "focal_gamma": Spec(float, minimum=0.0),
        "features": Spec(str, choices=lambda: list(CONFIDNET_FEATURES)),
        "error_weight": positive_float(),
    },
    "finetune": {
        "epochs": non_negative_int(),
        "batch_size": positive_int(),
        "lr": positive_float(),
    },
    "baselines": {
        "mc_samples": positive_int(),
        "batch_size": positive_int(),
    },
    "evaluate": {
        "bootstrap_resamples": Spec(int, minimum=100),
    },
    "tracking": {
        "experiment": Spec(str),
    },
}


def _check(node: Any, schema: dict[str, Any], prefix: str, problems: list[str]) -> None:
    if not isinstance(node, dict):
        problems.append(f"{prefix.rstrip('.')}: must be a mapping of keys, got {node!r}")
        return
    for key, value in node.items():
        path = f"{prefix}{key}"
        if key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            problems.append(f"{path}: unknown key{hint} (known: {', '.join(schema)})")
            continue
        expected = schema[key]
        if isinstance(expected, dict):
            _check(value, expected, f"{path}.", problems)
        else:
            problem = expected.problem(value)
            if problem:
                problems.append(f"{path} = {value!r}: {problem}")
    for key in schema:
        if key not in node:
            problems.append(f"{prefix}{key}: missing")


def _cross_key_problems(params: dict[str, Any]) -> list[str]:
    """Problems that involve more than one key (each key on its own is valid)."""
    error_weighted = _registry_attribute("pipeline.losses", "ERROR_WEIGHTED_LOSSES")
    weight, loss = params["confidnet"]["error_weight"], params["loss"]
    if weight != 1 and loss not in error_weighted:
        return [f"confidnet.error_weight = {weight!r}: only the losses "
                f"{', '.join(error_weighted)} weigh errors; loss = {loss!r} needs "
                "confidnet.error_weight = 1"]
    return []


def validate(params: dict[str, Any]) -> dict[str, Any]:
    """Return ``params`` unchanged if valid, else raise :class:`ParamsError` with every problem."""
    problems: list[str] = []
    _check(params, SCHEMA, "", problems)
    problems += _cross_key_problems(params) if not problems else []
    if problems:
        raise ParamsError("invalid params.yaml:\n  " + "\n  ".join(problems))
    return params


def load_params(path: Path | str = "params.yaml") -> dict[str, Any]:
    """Read and validate ``params.yaml`` (relative to the working directory, which DVC
    sets to the copy being run, not to ``DVC_ROOT``)."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found; run from the project root")
    params = read_yaml(path.read_text()) or {}
    return validate(params)
