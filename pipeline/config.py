"""``params.yaml``: loading and validation before any stage does work.

The file's shape is the typed model :class:`Params` (pydantic, strict: no coercion, no
unknown keys, no NaN). Its errors are reworded so that all problems are reported at once,
each naming the key (dotted), the bad value and what is allowed; unknown keys get a
did-you-mean.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from pipeline.dvcfile import read_yaml  # also imported from here by benchmarks and tests
from pipeline.errors import ParamsError
from pipeline.registry import registered_names
from pipeline.runtime import (
    Precision,
    project_root,  # noqa: F401  (re-exported: it lived here)
)


def _registry_attribute(module: str, attribute: str) -> Any:
    """``module.attribute``, imported when validation reads it. On purpose not a static
    import: the registries hold what params may *name*, while config is plumbing every
    stage runs, and must not pull the science modules into every stage (and its ``dvc.yaml``
    deps). A stage that uses a registry imports it, and its deps list it. The modules read
    here import torch only where their functions run, so validating costs no torch
    (``tests/test_stage_inputs.py``)."""
    import importlib

    return getattr(importlib.import_module(module), attribute)


def _registry_names(module: str, attribute: str) -> Callable[[], Sequence[str]]:
    """The names of a registry, read from its module's source where that module would
    import torch (the models: :func:`pipeline.registry.registered_names`)."""
    return lambda: registered_names(module, attribute)


def _preset_names(group: str) -> Callable[[], Sequence[str]]:
    def names() -> list[str]:
        from pipeline.settings import preset_names

        return preset_names(group)

    return names


def _invalid(allowed: str) -> PydanticCustomError:
    return PydanticCustomError("invalid", "valid values: {allowed}", {"allowed": allowed})


def _one_of(names: Callable[[], Sequence[str]]) -> AfterValidator:
    """A string among ``names()``, read when a value is checked (registries, presets)."""
    def check(value: str) -> str:
        if value not in names():
            raise _invalid(", ".join(names()))
        return value

    return AfterValidator(check)


def _is_device(value: str) -> str:
    head, _, index = value.partition(":")
    if value in ("auto", "cpu", "cuda") or (head == "cuda" and index.isdigit()):
        return value
    raise _invalid("auto, cpu, cuda, cuda:N")


def _if_shaped(kind: type, ok: Callable[[Any], bool], allowed: str) -> BeforeValidator:
    """Check a whole list or mapping at once (one problem for the key, not one per item);
    a value of another kind is left to the type check."""
    def check(value: Any) -> Any:
        if isinstance(value, kind) and not ok(value):
            raise _invalid(allowed)
        return value

    return BeforeValidator(check)


def _is_milestones(value: list[Any]) -> bool:
    ints = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    return ints and list(value) == sorted(set(value))


def _is_checksum_map(value: dict[Any, Any]) -> bool:
    return all(isinstance(k, str) and isinstance(v, str) and re.fullmatch(r"[0-9a-f]{32}", v)
               for k, v in value.items())


PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]
PositiveFloat = Annotated[float, Field(gt=0.0)]
Fraction = Annotated[float, Field(gt=0.0, le=1.0)]
Milestones = Annotated[list[int], _if_shaped(list, _is_milestones,
                                             "increasing positive epoch numbers, e.g. [90, 135]")]
Checksums = Annotated[dict[str, str], _if_shaped(
    dict, _is_checksum_map, "a mapping of archive file name to its 32-hex MD5")]

# How ConfidNet phase 1 sees the training images: through the frozen classifier with its
# dropout active, as the authors' learner does; in eval mode, batch by batch; or as features
# cached once by extract_features (see stages/train_confidnet.py).
ConfidNetFeatures = Literal["dropout", "no_dropout", "cached"]
# What the dataset asks of the classifier: one class per image, or one per pixel (CamVid).
Task = Literal["classification", "segmentation"]
CONFIDNET_FEATURES: tuple[str, ...] = get_args(ConfidNetFeatures)


class Section(BaseModel):
    """A mapping of params: exact types (an int may stand for a float), finite numbers, no
    unknown keys."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class DataParams(Section):
    test_fraction: Annotated[float, Field(gt=0.0, le=0.9)]
    val_fraction: Annotated[float, Field(gt=0.0, le=0.9)]
    split_seed: NonNegativeInt | None
    mirror: str
    checksums: Checksums
    image_scale: Fraction  # segmentation only: images resized by this factor
    max_images_per_split: NonNegativeInt  # segmentation only: 0 = every image


class AugmentationParams(Section):
    hflip: bool
    rotate_degrees: Annotated[float, Field(ge=0.0, le=180.0)]
    crop_padding: NonNegativeInt


Optimizer = Literal["sgd", "adam"]


class ClassifierParams(Section):
    model: Annotated[str, _one_of(_registry_names("pipeline.models", "MODELS"))]
    optimizer: Optimizer
    hidden: PositiveInt
    dropout: Annotated[float, Field(ge=0.0, le=0.95)]
    epochs: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    momentum: Annotated[float, Field(ge=0.0, le=1.0)]
    weight_decay: NonNegativeFloat
    milestones: Milestones
    gamma: Fraction
    augmentation: AugmentationParams


class ConfidNetParams(Section):
    width: PositiveInt
    layers: PositiveInt
    epochs: PositiveInt
    batch_size: PositiveInt
    lr: PositiveFloat
    focal_alpha: Fraction
    focal_gamma: NonNegativeFloat
    features: ConfidNetFeatures
    error_weight: PositiveFloat


class FinetuneParams(Section):
    epochs: NonNegativeInt
    batch_size: PositiveInt
    lr: PositiveFloat


class BaselinesParams(Section):
    mc_samples: PositiveInt
    batch_size: PositiveInt
    trustscore_train_pixels: PositiveInt  # segmentation only


class ReportParams(Section):
    figure_images: NonNegativeInt  # segmentation only: test images of the Fig. 5 panel


class EvaluateParams(Section):
    bootstrap_resamples: Annotated[int, Field(ge=100)]


class TrackingParams(Section):
    experiment: str


class Params(Section):
    """The whole of ``params.yaml``."""

    setting: Annotated[str, _one_of(_preset_names("setting"))]
    budget: Annotated[str, _one_of(_preset_names("budget"))]
    seed: NonNegativeInt
    dataset: Annotated[str, _one_of(_registry_names("pipeline.data", "DATASETS"))]
    task: Task
    loss: Annotated[str, _one_of(_registry_names("pipeline.losses", "LOSSES"))]
    criterion: Annotated[str, _one_of(_registry_names("pipeline.losses", "CRITERIA"))]
    device: Annotated[str, AfterValidator(_is_device)]
    precision: Precision
    channels_last: bool
    nproc_per_node: PositiveInt
    checkpoint_every_seconds: NonNegativeFloat
    data: DataParams
    classifier: ClassifierParams
    confidnet: ConfidNetParams
    finetune: FinetuneParams
    baselines: BaselinesParams
    evaluate: EvaluateParams
    report: ReportParams
    tracking: TrackingParams

    @model_validator(mode="after")
    def _error_weight_needs_a_loss_that_weighs_errors(self) -> Params:
        """Checked once every key on its own is valid."""
        weighted = _registry_attribute("pipeline.losses", "ERROR_WEIGHTED_LOSSES")
        weight = self.confidnet.error_weight
        if weight != 1 and self.loss not in weighted:
            raise PydanticCustomError("cross_key", "{problem}", {"problem": (
                f"confidnet.error_weight = {weight!r}: only the losses {', '.join(weighted)} "
                f"weigh errors; loss = {self.loss!r} needs confidnet.error_weight = 1")})
        return self

    @model_validator(mode="after")
    def _task_matches_the_dataset(self) -> Params:
        """``task`` is the dataset's, and each task's knobs hold values it can use."""
        datasets = _registry_attribute("pipeline.data", "DATASETS")
        expected = datasets[self.dataset].task
        problems = []
        if self.task != expected:
            problems.append(f"task = {self.task!r}: dataset {self.dataset!r} is a {expected} "
                            f"dataset; set task: {expected}")
        elif expected == "segmentation":
            segmenting = [(self.confidnet.features == "cached", "confidnet.features = 'cached'",
                           "dropout or no_dropout (decoder feature maps are not cached)"),
                          (self.loss == "ranking", "loss = 'ranking'",
                           "mse, bce or focal (pairs of pixels would not fit)"),
                          (self.classifier.augmentation.rotate_degrees != 0
                           or self.classifier.augmentation.crop_padding != 0,
                           "classifier.augmentation rotate_degrees / crop_padding",
                           "0 (segmentation flips only: the label maps follow the images)"),
                          (self.nproc_per_node != 1, f"nproc_per_node = {self.nproc_per_node}",
                           "1 (segmentation trains in one process)")]
            problems += [f"{what}: task segmentation needs {fix}"
                         for bad, what, fix in segmenting if bad]
        else:
            if self.data.image_scale != 1 or self.data.max_images_per_split != 0:
                problems.append(
                    f"data.image_scale = {self.data.image_scale!r} / data.max_images_per_split"
                    f" = {self.data.max_images_per_split!r}: only a segmentation dataset is "
                    f"scaled or capped; {self.dataset!r} needs 1.0 and 0")
        if problems:
            raise PydanticCustomError("cross_key", "{problem}",
                                      {"problem": "; ".join(problems)})
        return self


_KIND_NAMES = {"int_type": "an integer", "float_type": "a number", "string_type": "a string",
               "bool_type": "true or false", "list_type": "a list", "dict_type": "a mapping"}


def _annotation(loc: tuple[int | str, ...]) -> Any:
    """The declared type at ``loc`` (a model class for a section)."""
    annotation: Any = Params
    for key in loc:
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if not is_section or key not in annotation.model_fields:
            return None
        annotation = annotation.model_fields[key].annotation
    return annotation


def _problem(error: ErrorDetails) -> str:
    """One line for one pydantic error, in this project's words."""
    loc, value, kind = error["loc"], error["input"], error["type"]
    path = ".".join(str(key) for key in loc)
    ctx = error.get("ctx", {})
    if kind == "missing":
        return f"{path}: missing"
    if kind == "extra_forbidden":
        known = list(_annotation(loc[:-1]).model_fields)
        prefix = "".join(f"{key}." for key in loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
        return f"{path}: unknown key{hint} (known: {', '.join(known)})"
    if kind == "model_type":
        return f"{path or 'params.yaml'}: must be a mapping of keys, got {value!r}"
    if kind == "cross_key":
        return str(ctx["problem"])
    annotation = _annotation(loc)
    if kind in _KIND_NAMES:
        nullable = type(None) in get_args(annotation)
        expected = _KIND_NAMES[kind] + (" or null" if nullable else "")
        got = "not a boolean" if isinstance(value, bool) else f"got {type(value).__name__}"
        problem = f"must be {expected}, {got}"
    elif kind == "literal_error":
        problem = f"valid values: {', '.join(get_args(annotation))}"
    else:
        bounds = {"greater_than_equal": ">= {ge}", "greater_than": "> {gt}",
                  "less_than_equal": "<= {le}", "finite_number": "a finite number"}
        problem = f"must be {bounds[kind].format(**ctx)}" if kind in bounds else error["msg"]
    return f"{path} = {value!r}: {problem}"


def typed(params: Any) -> Params:
    """``params`` as the typed :class:`Params`, else :class:`ParamsError` with every problem."""
    try:
        return Params.model_validate(params)
    except ValidationError as error:
        problems = [_problem(detail) for detail in error.errors()]
        raise ParamsError("invalid params.yaml:\n  " + "\n  ".join(problems)) from None


def validate(params: dict[str, Any]) -> dict[str, Any]:
    """Return ``params`` unchanged if valid, else raise :class:`ParamsError` with every problem."""
    typed(params)
    return params


def _read(path: Path | str) -> Any:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found; run from the project root")
    return read_yaml(path.read_text()) or {}


def load_params(path: Path | str = "params.yaml") -> dict[str, Any]:
    """Read and validate ``params.yaml`` (relative to the working directory, which DVC
    sets to the copy being run, not to ``DVC_ROOT``)."""
    return validate(_read(path))


def load_config(path: Path | str = "params.yaml") -> Params:
    """:func:`load_params`, typed: ``load_config().confidnet.epochs``."""
    return typed(_read(path))
