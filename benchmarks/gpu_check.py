"""GPU check: epoch times of every Table 1 setting, one real full-recipe run, GPU-hours.

Three parts, each printed as soon as it is measured (``benchmarks/gpu_check.sh`` runs this
with an environment that can import the project):

1. **Epoch times** of every setting in ``conf/setting/`` but the digits default, on
   synthetic data of the real shapes: the pipeline's own loops (``train_classifier``,
   ``fit_confidence`` for phase 1 in the preset's scheme and for fine-tuning) on a few
   batches of the real batch size, two epochs each; the second is timed (the first pays
   for kernel selection and allocation) and scaled to the real split sizes. Measured as the
   stages run (deterministic algorithms on CUDA), once per ``--variants`` entry: ``fp32``
   (the default params) and ``bf16-cl`` (``precision: bf16``, ``channels_last: true``).
   A segmentation setting (``camvid_segnet``) runs its own loops as its stages do: SegNet
   trained on label maps with void pixels, validated per epoch on mean IoU; phase 1, the
   per-pixel head over the frozen SegNet's decoder features, recomputed (dropout on, flips)
   for every batch; fine-tuning through SegNet's encoder copy; validation confidences image
   by image. Images of the preset's size times ``data.image_scale`` (``--image-scale``).
   A setting whose dataset or model this project does not have is listed as skipped.
2. **The projection** of Table 1 in GPU-hours: per setting, the preset's epochs times the
   measured epoch times (classifier, phase 1, fine-tuning), times ``--seeds`` (3). MC
   Dropout, TrustScore and the evaluation are left out (seconds per seed).
3. **The MNIST MLP full preset, one seed**, on the real MNIST archives of ``--mirror``
   (the four ``*-ubyte.gz`` files; their MD5s are taken as they are, as for any re-packed
   mirror): every stage of ``dvc.yaml`` in order, each module run as ``python -m
   stages.<name>`` runs it but in this process (no interpreter start and CUDA set-up per
   stage), in a temporary copy of the project, without DVC, untracked
   (``CONFIDNET_TRACKING=off``: no tracking process competes with the timing, and the GPU
   machine has no MLflow). Prints each stage's wall time and the headline.

``--smoke`` runs all of it on the CPU in seconds: one batch of 4 samples per loop (CamVid's
images scaled by 0.1, to 36x48) and the smoke budget for the full run
(``tests/test_gpu_check.py`` runs it on fake MNIST archives).

    python benchmarks/gpu_check.py --mirror mnist_archives/
    python benchmarks/gpu_check.py --smoke --mirror folder_of_fake_archives/
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import runpy
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import yaml

from pipeline.artifacts import STAGE_ORDER
from pipeline.augment import Augmentation
from pipeline.camvid import scaled_size
from pipeline.data import DATASETS
from pipeline.features import AugmentedTargets, FeatureDropoutTargets, SegmentationTargets
from pipeline.losses import LOSSES, loss_kwargs
from pipeline.models import (
    MODELS,
    ConfidNetHead,
    ConfidNetModel,
    build_classifier,
    build_confidnet_head,
)
from pipeline.prepared import Split
from pipeline.runtime import computing, resolve_device, seed_everything
from pipeline.segmentation import FrozenEncoderHead, pixel_confidences
from pipeline.settings import compose, preset_names
from pipeline.tracking import TRACKING_SWITCH
from pipeline.training import ConfidenceData, Relabel, fit_confidence, train_classifier

REPO = Path(__file__).resolve().parents[1]

# Official (train, test) sizes; validation is floor(val_fraction * train) of the training
# set (pipeline.image_datasets.authors_split). CamVid ships its own validation split.
OFFICIAL_SIZES: dict[str, tuple[int, int, int | None]] = {
    "mnist": (60_000, 10_000, None), "svhn": (73_257, 26_032, None),
    "cifar10": (50_000, 10_000, None), "cifar100": (50_000, 10_000, None),
    "camvid": (367, 233, 101)}
VARIANTS: dict[str, dict[str, Any]] = {"fp32": {"precision": "fp32", "channels_last": False},
            "bf16-cl": {"precision": "bf16", "channels_last": True}}
# CamVid's images in smoke mode: 360x480 scaled to 36x48 (SegNet needs 32x32 at least).
SMOKE_IMAGE_SCALE = 0.1
# Archives of the MNIST mirror (pipeline.image_datasets' names).
MNIST_ARCHIVES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                  "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@dataclass
class Timing:
    """Seconds per whole epoch of one setting under one variant, or why it was skipped."""

    setting: str
    variant: str
    classifier: float = math.nan
    phase1: float = math.nan
    finetune: float = math.nan
    epochs: tuple[int, int, int] = (0, 0, 0)
    phase1_path: str = ""
    skipped: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    def seed_hours(self) -> float:
        """Hours of one seed's training loops; a phase of 0 epochs (not measured) adds 0."""
        return sum(epochs * seconds for epochs, seconds in zip(
            self.epochs, (self.classifier, self.phase1, self.finetune), strict=True)
            if epochs) / 3600


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def second_epoch_seconds(run: Callable[[Callable[[int, dict[str, float]], None]], Any],
                         device: torch.device) -> float:
    """Wall seconds of the second of two epochs of ``run(log)``, read off the times at
    which the loop logs each epoch (after its once-per-epoch host sync)."""
    stamps: list[float] = []

    def log(epoch: int, row: dict[str, float]) -> None:
        synchronize(device)
        stamps.append(time.perf_counter())

    run(log)
    if len(stamps) < 2:
        raise RuntimeError(f"expected two logged epochs, got {len(stamps)}")
    return stamps[-1] - stamps[-2]


def shapes(params: dict[str, Any]) -> tuple[tuple[int, ...], int, int, int]:
    """(input shape, classes, train size, validation size) of a setting's dataset; a
    segmentation dataset's images scaled by ``data.image_scale`` as its download stage
    scales them."""
    name = params["dataset"]
    if name not in DATASETS.names() or name not in OFFICIAL_SIZES:
        raise LookupError(f"dataset {name!r} is not in this project")
    entry = DATASETS[name]
    n_train, _, n_val = OFFICIAL_SIZES[name]
    if n_val is None:
        n_val = math.floor(params["data"]["val_fraction"] * n_train)
        n_train -= n_val
    shape = tuple(entry.input_shape)
    if entry.task == "segmentation":
        channels, height, width = shape
        shape = (channels, *scaled_size((height, width), float(params["data"]["image_scale"])))
    return shape, entry.num_classes, n_train, n_val


def synthetic(n: int, shape: tuple[int, ...], classes: int, label_shape: tuple[int, ...],
              seed: int) -> Split:
    generator = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, *shape, generator=generator),
                 torch.randint(0, classes, (n, *label_shape), generator=generator))


def label_maps(n: int, shape: tuple[int, ...], classes: int, void: int, seed: int) -> Split:
    """``n`` images with label maps of ``classes`` classes, about one pixel in
    ``classes + 1`` void."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n, *shape[1:]), generator=generator)
    void_pixels = torch.rand(labels.shape, generator=generator) < 1 / (classes + 1)
    return Split(torch.randn(n, *shape, generator=generator),
                 labels.masked_fill(void_pixels, void))


def run_sizes(cfg_batch: int, batches: int, batch_size: int | None, n_train: int,
              n_val: int) -> tuple[int, int, int]:
    """(batch size, training samples, validation samples) actually run: ``batches``
    batches, the validation set in the real proportion to the training set."""
    size = batch_size or cfg_batch
    n = min(n_train, batches * size)
    return size, n, max(2, round(n * n_val / n_train))


def measure(setting: str, variant: str, device: torch.device, batches: int,
            batch_size: int | None, image_scale: float | None = None) -> Timing:
    """Epoch times of ``setting`` under ``variant`` (see the module docstring);
    ``image_scale`` replaces a segmentation preset's ``data.image_scale``."""
    params = yaml.safe_load(compose([f"setting={setting}"], root=REPO))
    cls_cfg, head_cfg, ft_cfg = params["classifier"], params["confidnet"], params["finetune"]
    timing = Timing(setting, variant,
                    epochs=(cls_cfg["epochs"], head_cfg["epochs"], ft_cfg["epochs"]))
    if cls_cfg["model"] not in MODELS.names():
        timing.skipped = f"model {cls_cfg['model']!r} is not in pipeline.models"
        return timing
    if params.get("task") == "segmentation":
        if image_scale is not None:
            params["data"]["image_scale"] = image_scale
        return measure_segmentation(params, timing, device, batches, batch_size)
    try:
        shape, classes, n_train, n_val = shapes(params)
    except LookupError as error:
        timing.skipped = str(error)
        return timing
    seed = params["seed"]
    seed_everything(seed, device)

    def sizes(cfg_batch: int) -> tuple[int, int, int]:
        return run_sizes(cfg_batch, batches, batch_size, n_train, n_val)

    torch.manual_seed(seed)
    model = build_classifier(shape, classes, cls_cfg)
    with torch.no_grad():
        probe = model.eval()(torch.zeros(2, *shape))
    label_shape = tuple(probe.shape[2:])  # () for image classification, (H, W) per pixel
    augment = Augmentation.from_params(cls_cfg["augmentation"], (0.0,) * shape[0])

    size, n, n_v = sizes(cls_cfg["batch_size"])
    train, val = synthetic(n, shape, classes, label_shape, 0), synthetic(n_v, shape, classes,
                                                                         label_shape, 1)
    cfg = {**cls_cfg, "epochs": 2, "batch_size": size}
    timing.classifier = second_epoch_seconds(
        lambda log: train_classifier(model, train, val, cfg, device, seed, log,
                                     augment=augment), device) * n_train / n
    model.eval()

    # phase 1 in the preset's scheme (stages/train_confidnet.py's choice)
    size, n, n_v = sizes(head_cfg["batch_size"])
    dims = model.feature_dim
    exact = (head_cfg["features"] == "dropout" and not augment.active
             and model.dropout_only_on_features)
    labels = torch.randint(0, classes, (n, *label_shape))
    relabel: Relabel | None
    if head_cfg["features"] == "cached":
        inputs, relabel, timing.phase1_path = torch.randn(n, dims).relu(), None, "cached"
    elif exact:
        inputs, timing.phase1_path = torch.randn(n, dims).relu(), "dropout, cached features"
        relabel = FeatureDropoutTargets(model, params["criterion"])
    else:
        inputs, timing.phase1_path = synthetic(n, shape, classes, label_shape, 2).x, \
            f"{head_cfg['features']}, frozen forward"
        relabel = AugmentedTargets(model, augment, params["criterion"], features=True,
                                   dropout=head_cfg["features"] == "dropout")

    def targets(count: int, x: torch.Tensor) -> ConfidenceData:
        correct = (torch.arange(count) % 5 != 0).long()  # some errors, so AUPR-Error is defined
        return ConfidenceData(x, torch.rand(count), correct,
                              torch.randint(0, classes, (count, *label_shape)))

    head = ConfidNetHead(dims, head_cfg["width"], head_cfg["layers"])
    p1_train = replace(targets(n, inputs), labels=labels)
    p1_val = targets(n_v, torch.randn(n_v, dims).relu())
    loss, kwargs = LOSSES[params["loss"]], loss_kwargs(params)
    timing.phase1 = second_epoch_seconds(
        lambda log: fit_confidence(head, p1_train, p1_val, loss, kwargs, 2, head_cfg["lr"],
                                   size, device, seed, log, "phase 1", relabel=relabel),
        device) * n_train / n

    size, n, n_v = sizes(ft_cfg["batch_size"])
    finetuned = ConfidNetModel(model, head)
    ft_relabel = AugmentedTargets(model, augment, params["criterion"]) if augment.active \
        else None
    ft_train = targets(n, synthetic(n, shape, classes, label_shape, 3).x)
    ft_val = targets(n_v, synthetic(n_v, shape, classes, label_shape, 4).x)
    timing.finetune = second_epoch_seconds(
        lambda log: fit_confidence(finetuned, ft_train, ft_val, loss, kwargs, 2, ft_cfg["lr"],
                                   size, device, seed, log, "finetune", relabel=ft_relabel),
        device) * n_train / n
    return timing


def measure_segmentation(params: dict[str, Any], timing: Timing, device: torch.device,
                         batches: int, batch_size: int | None) -> Timing:
    """The epoch times of a segmentation setting, its loops called as its stages call
    them (``stages/train_classifier.py``; ``stages/train_confidnet.py``'s
    ``segmentation_body``; ``stages/finetune.py``) on synthetic label maps; fine-tuning only
    when the preset has epochs of it."""
    cls_cfg, head_cfg, ft_cfg = params["classifier"], params["confidnet"], params["finetune"]
    shape, classes, n_train, n_val = shapes(params)
    void = DATASETS[params["dataset"]].void_label
    assert void is not None, "a segmentation dataset has a void label"
    seed = params["seed"]
    seed_everything(seed, device)

    def sizes(cfg_batch: int) -> tuple[int, int, int]:
        return run_sizes(cfg_batch, batches, batch_size, n_train, n_val)

    def maps(n: int, split_seed: int) -> Split:
        return label_maps(n, shape, classes, void, split_seed)

    def pixels_correct(split: Split) -> torch.Tensor:
        """Correctness of each non-void pixel (some errors, so AUPR-Error is defined), as
        the features of ``extract_features`` list them."""
        return (torch.arange(int((split.y != void).sum())) % 5 != 0).long()

    torch.manual_seed(seed)
    model = build_classifier(shape, classes, cls_cfg)
    augment = Augmentation.from_params(cls_cfg["augmentation"], (0.0,) * shape[0])
    size, n, n_v = sizes(cls_cfg["batch_size"])
    train, val = maps(n, 0), maps(n_v, 1)
    cfg = {**cls_cfg, "epochs": 2, "batch_size": size}
    timing.classifier = second_epoch_seconds(
        lambda log: train_classifier(model, train, val, cfg, device, seed, log,
                                     augment=augment, num_classes=classes, void_label=void),
        device) * n_train / n
    model.eval()

    # phase 1: the per-pixel head on the frozen SegNet, its targets recomputed per batch
    size, n, n_v = sizes(head_cfg["batch_size"])
    train, val = maps(n, 2), maps(n_v, 3)
    head = build_confidnet_head(model, head_cfg)
    relabel = SegmentationTargets(model, params["criterion"], void, hflip=augment.hflip,
                                  features=True, dropout=head_cfg["features"] == "dropout")
    timing.phase1_path = f"{head_cfg['features']}, frozen forward, per pixel"
    scorer = FrozenEncoderHead(model, head)
    p1_train = ConfidenceData(train.x, torch.empty(0), pixels_correct(train), train.y)
    p1_val = ConfidenceData(val.x, torch.empty(0), pixels_correct(val))
    loss, kwargs = LOSSES[params["loss"]], loss_kwargs(params)
    timing.phase1 = second_epoch_seconds(
        lambda log: fit_confidence(head, p1_train, p1_val, loss, kwargs, 2, head_cfg["lr"],
                                   size, device, seed, log, "phase 1", relabel=relabel,
                                   val_scores=lambda: pixel_confidences(scorer, val, void,
                                                                        device)),
        device) * n_train / n
    if not ft_cfg["epochs"]:
        return timing

    size, n, n_v = sizes(ft_cfg["batch_size"])
    train, val = maps(n, 4), maps(n_v, 5)
    finetuned = ConfidNetModel(model, head)
    ft_relabel = SegmentationTargets(model, params["criterion"], void, hflip=augment.hflip)
    ft_train = ConfidenceData(train.x, torch.empty(0), pixels_correct(train), train.y)
    ft_val = ConfidenceData(val.x, torch.empty(0), pixels_correct(val), val.y)
    timing.finetune = second_epoch_seconds(
        lambda log: fit_confidence(finetuned, ft_train, ft_val, loss, kwargs, 2, ft_cfg["lr"],
                                   size, device, seed, log, "finetune", relabel=ft_relabel,
                                   val_scores=lambda: pixel_confidences(finetuned, val, void,
                                                                        device)),
        device) * n_train / n
    return timing


def matmul_rate(device: torch.device, smoke: bool) -> dict[str, float]:
    """TFLOP/s of a square matrix product in float32 and bfloat16 (mean of 10 after 3)."""
    size = 256 if smoke else 8192
    rates = {}
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        synchronize(device)
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        synchronize(device)
        rates[str(dtype).removeprefix("torch.")] = 10 * 2 * size**3 / (
            time.perf_counter() - start) / 1e12
    return rates


# ------------------------------------------------------------------------- the full run


def project_copy(folder: Path) -> None:
    """What a stage reads besides params.yaml (presets, dvc.yaml and the code it lists,
    for checkpoint fingerprints), without outputs, DVC or git."""
    for name in ("pipeline", "stages", "conf"):
        shutil.copytree(REPO / name, folder / name,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(REPO / "dvc.yaml", folder / "dvc.yaml")


def run_stage_module(stage: str, folder: Path) -> None:
    """``python -m stages.<stage>`` in ``folder``, in this process, untracked (see the
    module docstring)."""
    here = Path.cwd()
    os.chdir(folder)
    try:
        with warnings.catch_warnings(), mock.patch.dict(os.environ, {TRACKING_SWITCH: "off"}):
            warnings.simplefilter("ignore")
            runpy.run_module(f"stages.{stage}", run_name="__main__", alter_sys=False)
    except SystemExit as stop:
        if stop.code not in (0, None):
            raise RuntimeError(f"stages.{stage} stopped with status {stop.code}") from None
    finally:
        os.chdir(here)


def check_mirror(mirror: Path) -> None:
    """Stop (before any work) if ``mirror`` lacks one of the MNIST archives."""
    missing = [name for name in MNIST_ARCHIVES if not (mirror / name).is_file()]
    if missing:
        raise SystemExit(f"error: {mirror} lacks {', '.join(missing)}; give --mirror a folder "
                         f"with the four MNIST archives ({', '.join(MNIST_ARCHIVES)})")


def mnist_params(mirror: Path, smoke: bool, device: str) -> str:
    """params.yaml of the MNIST MLP preset (smoke budget with ``smoke``), reading the
    archives of ``mirror`` with their own MD5s."""
    check_mirror(mirror)
    overrides = ["setting=mnist_mlp", "seed=0"] + (["budget=smoke"] if smoke else [])
    params = yaml.safe_load(compose(overrides, root=REPO))
    params["device"] = device
    params["data"]["mirror"] = str(mirror.resolve())
    params["data"]["checksums"] = {
        name: hashlib.md5((mirror / name).read_bytes()).hexdigest() for name in MNIST_ARCHIVES}
    return yaml.safe_dump(params, sort_keys=False)


def full_run(mirror: Path, smoke: bool, device: str, keep: Path | None) -> dict[str, Any]:
    """Every stage of the MNIST MLP preset, in order; seconds per stage and the headline."""
    folder = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        project_copy(folder)
        (folder / "params.yaml").write_text(mnist_params(mirror, smoke, device))
        seconds: dict[str, float] = {}
        for stage in STAGE_ORDER:
            start = time.perf_counter()
            run_stage_module(stage, folder)
            seconds[stage] = time.perf_counter() - start
            print(f"  {stage}: {seconds[stage]:.1f} s", flush=True)
        headline = json.loads((folder / "metrics" / "headline.json").read_text())
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            for name in ("reports/report.md", "metrics/headline.json",
                         "metrics/classifier.json", "metrics/train_confidnet.json"):
                if (folder / name).exists():
                    shutil.copy(folder / name, keep / Path(name).name)
        return {"seconds": seconds, "headline": headline}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------- output


def hours(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def seconds_text(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def timing_table(timings: Sequence[Timing], seeds: int) -> str:
    lines = ["| setting | variant | classifier epoch, s | phase-1 epoch, s (path) | "
             "fine-tuning epoch, s | epochs cls / p1 / ft | one seed, h | "
             f"{seeds} seeds, GPU-h |", "|---|---|---|---|---|---|---|---|"]
    for t in timings:
        if t.skipped:
            lines.append(f"| {t.setting} | {t.variant} | skipped: {t.skipped} | | | | | |")
            continue
        c, p, f = t.epochs
        lines.append(f"| {t.setting} | {t.variant} | {seconds_text(t.classifier)} | "
                     f"{seconds_text(t.phase1)} ({t.phase1_path}) | "
                     f"{seconds_text(t.finetune)} | {c} / {p} / {f} | "
                     f"{hours(t.seed_hours())} | {hours(seeds * t.seed_hours())} |")
    return "\n".join(lines)


def totals(timings: Sequence[Timing], seeds: int) -> dict[str, float]:
    """Table 1 in GPU-hours per variant: the sum over the measured settings."""
    out: dict[str, float] = {}
    for t in timings:
        if not t.skipped:
            out[t.variant] = out.get(t.variant, 0.0) + seeds * t.seed_hours()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mirror", type=Path, help="folder with the four MNIST archives "
                        "(the full run is skipped without it)")
    parser.add_argument("--smoke", action="store_true",
                        default=os.environ.get("GPU_CHECK_SMOKE") == "1",
                        help="CPU, one batch of 4 per loop, smoke budget (or GPU_CHECK_SMOKE=1)")
    parser.add_argument("--device", default=None, help="auto (default) | cpu | cuda | cuda:N")
    parser.add_argument("--settings", nargs="*", default=None,
                        help="presets to time (default: all but digits_mlp)")
    parser.add_argument("--variants", nargs="*", default=None, choices=sorted(VARIANTS),
                        help="default: fp32 bf16-cl (smoke: fp32)")
    parser.add_argument("--batches", type=int, default=None,
                        help="batches per timed epoch (default 20; smoke 1)")
    parser.add_argument("--image-scale", type=float, default=None,
                        help="segmentation images scaled by this (default: the preset's "
                        f"data.image_scale; smoke {SMOKE_IMAGE_SCALE})")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per setting in Table 1")
    parser.add_argument("--keep", type=Path, default=None,
                        help="copy the full run's report and metrics here")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    if args.mirror is not None:
        check_mirror(args.mirror)
    device = resolve_device(args.device or ("cpu" if args.smoke else "auto"))
    batches = args.batches or (1 if args.smoke else 20)
    batch_size = 4 if args.smoke else None
    image_scale = (args.image_scale if args.image_scale is not None
                   else SMOKE_IMAGE_SCALE if args.smoke else None)
    if image_scale is not None and not 0 < image_scale <= 1:
        parser.error(f"--image-scale {image_scale}: must be in (0, 1]")
    variants = args.variants or (["fp32"] if args.smoke else ["fp32", "bf16-cl"])
    settings = args.settings or [s for s in preset_names("setting", REPO) if s != "digits_mlp"]
    if "camvid_segnet" not in settings and args.settings is None:
        settings.append("camvid_segnet")  # Table 1's segmentation row, once it has a preset

    import faiss

    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    print(f"# GPU check, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
          f"{' (smoke: CPU, tiny batches; the figures mean nothing)' if args.smoke else ''}")
    print(f"\ndevice {device} ({gpu_name}); {platform.machine()}, {os.cpu_count()} CPUs; "
          f"torch {torch.__version__}; faiss {faiss.__version__} sees "
          f"{faiss.get_num_gpus() if hasattr(faiss, 'get_num_gpus') else 0} GPU(s)")
    rates = matmul_rate(device, args.smoke)
    print("matrix product, TFLOP/s: " + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()))
    print(f"\n## Epoch times (synthetic data of the real shapes, {batches} batches per epoch "
          "timed, scaled to the real split sizes"
          f"{'' if image_scale is None else f'; segmentation images scaled by {image_scale}'})\n",
          flush=True)
    timings: list[Timing] = []
    for variant in variants:
        for setting in settings:
            if setting not in preset_names("setting", REPO):
                timings.append(Timing(setting, variant, skipped="no preset in conf/setting/"))
                continue
            try:
                with computing(**VARIANTS[variant]):
                    timings.append(measure(setting, variant, device, batches, batch_size,
                                           image_scale))
            except Exception as error:  # noqa: BLE001  one setting's failure is a table row
                timings.append(Timing(setting, variant,
                                      skipped=f"{type(error).__name__}: {error}"[:200]))
            print(f"  measured {setting} ({variant})", file=sys.stderr, flush=True)
    print(timing_table(timings, args.seeds))
    print(f"\n## Table 1 projected ({args.seeds} seeds per setting, training loops only)\n")
    for variant, total in totals(timings, args.seeds).items():
        print(f"- {variant}: {total:.2f} GPU-hours over the measured settings")
    result: dict[str, Any] = {"device": str(device), "gpu": gpu_name, "matmul_tflops": rates,
                              "timings": [t.__dict__ for t in timings],
                              "table1_gpu_hours": totals(timings, args.seeds)}
    if args.mirror is not None:
        budget = "smoke budget" if args.smoke else "full preset"
        print(f"\n## MNIST MLP, {budget}, seed 0, real archives, every stage\n", flush=True)
        run = full_run(args.mirror, args.smoke, str(device), args.keep)
        result["full_run"] = run
        total = sum(run["seconds"].values())
        print(f"\ntotal {total:.1f} s ({total / 60:.1f} min)")
        head = run["headline"]
        print("headline: " + ", ".join(f"{k} {head[k]}" for k in (
            "test/confidnet/aupr_err", "test/mcp/aupr_err", "test/trustscore/aupr_err",
            "test/accuracy", "test/vs_mcp/verdict") if k in head))
        mlp = next((t for t in timings if t.setting == "mnist_mlp" and t.variant == "fp32"
                    and not t.skipped), None)
        if mlp is not None and not args.smoke:
            training = sum(run["seconds"][s] for s in
                           ("train_classifier", "train_confidnet", "finetune"))
            print(f"training stages {training / 60:.1f} min against "
                  f"{mlp.seed_hours() * 60:.1f} min projected from the epoch times")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
