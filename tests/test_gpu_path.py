"""The GPU path, checked on the CPU where it can be: no host sync per batch in the training
and evaluation loops, the ``precision`` and ``channels_last`` options (CPU autocast has
bfloat16), and where TrustScore's faiss index runs. The CUDA-only checks are skipped here."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import pipeline
from pipeline import baselines
from pipeline.augment import Augmentation
from pipeline.config import ParamsError, validate
from pipeline.features import (
    AugmentedTargets,
    SegmentationTargets,
    confidence_targets,
    extract,
)
from pipeline.losses import LOSSES
from pipeline.models import ConfidNetHead, build_classifier, build_confidnet_head
from pipeline.prepared import Split
from pipeline.runtime import PRECISIONS, Compute, compute, compute_params, computing
from pipeline.segmentation import FrozenEncoderHead, pixel_confidences
from pipeline.training import (
    ConfidenceData,
    FitResult,
    fit_confidence,
    predict,
    train_classifier,
)

CPU = torch.device("cpu")
PIPELINE_DIR = str(Path(pipeline.__file__).resolve().parent)
REPO = Path(__file__).resolve().parents[1]

# Tensor methods that make the host wait for the device (on a GPU): reading a value
# (item, float(), int(), bool(), tolist), copying to host memory (cpu, numpy), or making a
# tensor whose size depends on the values (nonzero, masked_select; indexing by a boolean
# mask is counted too, as ``[mask]``).
SYNCS = ("item", "cpu", "numpy", "tolist", "__float__", "__int__", "__bool__", "nonzero",
         "masked_select")

CLASSIFIER_CFG: dict[str, Any] = {
    "model": "smallconv_svhn", "hidden": 16, "dropout": 0.3, "epochs": 1, "batch_size": 16,
    "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "milestones": [], "gamma": 0.1}
AUGMENT = Augmentation(hflip=True, rotate_degrees=10.0, crop_padding=2, pad_value=(0.1, 0.0, -0.1))


def _boolean_mask(index: Any) -> bool:
    """Whether ``tensor[index]`` selects by a boolean mask (a data-dependent size)."""
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in parts)


@pytest.fixture
def host_syncs(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts the calls of :data:`SYNCS` and the boolean-mask selections made from the
    project's own code (``pipeline/``), by call site; torch's internals (the optimisers'
    step counters) are not counted."""
    found: Counter[str] = Counter()

    def record(what: str) -> None:
        caller = sys._getframe(2)
        if caller.f_code.co_filename.startswith(PIPELINE_DIR):
            where = Path(caller.f_code.co_filename).name
            found[f"{where}:{caller.f_lineno} {caller.f_code.co_name} {what}"] += 1

    for name in SYNCS:
        original = getattr(torch.Tensor, name)

        def counting(self: torch.Tensor, *args: Any, _original: Callable[..., Any] = original,
                     _name: str = name, **kwargs: Any) -> Any:
            record(f".{_name}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    getitem = torch.Tensor.__getitem__

    def selecting(self: torch.Tensor, index: Any) -> Any:
        if _boolean_mask(index):
            record("[mask]")
        return getitem(self, index)

    monkeypatch.setattr(torch.Tensor, "__getitem__", selecting)
    return found


def images(n: int, seed: int = 0, classes: int = 3) -> Split:
    """``n`` 3x8x8 images whose class shifts their mean: learnable in a few epochs."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=generator)
    x = torch.randn(n, 3, 8, 8, generator=generator) + y.view(-1, 1, 1, 1).float()
    return Split(x, y)


def classifier_run(n: int, cfg: dict[str, Any] | None = None,
                   augment: Augmentation | None = AUGMENT,
                   dropout: bool = True) -> tuple[FitResult, torch.nn.Module]:
    cfg = cfg or CLASSIFIER_CFG
    torch.manual_seed(0)
    model = build_classifier((3, 8, 8), 3, cfg)
    if not dropout:
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    result = train_classifier(model, images(n), images(32, seed=1), cfg, CPU, seed=0,
                              log=lambda epoch, row: None, augment=augment)
    return result, model


def phase1_run(n: int, loss: str = "mse") -> FitResult:
    """One epoch of the authors' phase 1 on images: augmented, through the frozen
    classifier with its dropout on, per batch."""
    torch.manual_seed(0)
    classifier = build_classifier((3, 8, 8), 3, CLASSIFIER_CFG).eval()
    train, val = images(n), images(32, seed=1)
    data = {name: confidence_targets(extract(classifier, split, 64, CPU), "tcp")
            for name, split in (("train", train), ("val", val))}
    head = ConfidNetHead(classifier.feature_dim, 8, 2)
    relabel = AugmentedTargets(classifier, AUGMENT, "tcp", features=True, dropout=True)
    return fit_confidence(head, replace(data["train"], inputs=train.x), data["val"],
                          LOSSES[loss], {}, epochs=1, lr=1e-3, batch_size=16, device=CPU,
                          seed=0, log=lambda epoch, row: None, desc="phase 1",
                          relabel=relabel)


def phase1_ranking_run(n: int) -> FitResult:
    return phase1_run(n, loss="ranking")


SEGNET_CFG: dict[str, Any] = {"model": "segnet", "hidden": 64, "dropout": 0.5}
VOID = 3  # label maps of 3 classes and void


def label_maps(n: int, seed: int) -> Split:
    """``n`` 3x32x32 images (SegNet's smallest) with label maps of 3 classes, void
    included."""
    generator = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, 3, 32, 32, generator=generator),
                 torch.randint(0, VOID + 1, (n, 32, 32), generator=generator))


def segmentation_phase1_run(n: int) -> FitResult:
    """One epoch of phase 1 on a SegNet (stages/train_confidnet.py's segmentation body):
    the per-pixel head on the frozen SegNet's decoder features, dropout on, flips, targets
    per pixel, void pixels out of the loss; ``n // 16`` images, one per batch (2 and 8
    batches, as the other loops), two validation images."""
    torch.manual_seed(0)
    classifier = build_classifier((3, 32, 32), VOID, SEGNET_CFG).eval()
    train, val = label_maps(n // 16, 0), label_maps(2, 1)
    head = build_confidnet_head(classifier, {})
    valid = int((val.y != VOID).sum())
    data = {"train": ConfidenceData(train.x, torch.empty(0), torch.empty(0), train.y),
            "val": ConfidenceData(val.x, torch.empty(0), (torch.arange(valid) % 3 > 0).long())}
    relabel = SegmentationTargets(classifier, "tcp", VOID, hflip=True, features=True,
                                  dropout=True)
    scorer = FrozenEncoderHead(classifier, head)
    return fit_confidence(head, data["train"], data["val"], LOSSES["mse"], {}, epochs=1,
                          lr=1e-3, batch_size=1, device=CPU, seed=0,
                          log=lambda epoch, row: None, desc="phase 1", relabel=relabel,
                          val_scores=lambda: pixel_confidences(scorer, val, VOID, CPU))


@pytest.mark.parametrize("loop", [classifier_run, phase1_run, phase1_ranking_run,
                                  segmentation_phase1_run],
                         ids=["classifier", "phase1", "phase1-ranking", "segmentation-phase1"])
def test_an_epoch_syncs_with_the_host_as_often_whatever_its_batches(
        loop: Callable[[int], Any], host_syncs: Counter[str]) -> None:
    """A per-batch ``.item()`` (or ``.cpu()``, ``float(tensor)``...) in a loop makes every
    GPU batch wait for the last; here 2 and 8 batches must sync the same number of times."""
    loop(32)
    few = Counter(host_syncs)
    host_syncs.clear()
    loop(128)
    assert host_syncs == few, f"syncs per call site, 2 batches: {dict(few)}; 8: {dict(host_syncs)}"
    assert sum(few.values()) > 0  # the counter sees the once-per-epoch reads


def test_prediction_and_extraction_copy_back_once(host_syncs: Counter[str]) -> None:
    torch.manual_seed(0)
    model = build_classifier((3, 8, 8), 3, CLASSIFIER_CFG)
    split = images(64)
    for batch_size in (8, 64):
        host_syncs.clear()
        predict(model, split.x, batch_size, CPU)
        assert sum(host_syncs.values()) == 1, dict(host_syncs)
    counts = []
    for batch_size in (8, 64):
        host_syncs.clear()
        extract(model, split, batch_size, CPU)
        counts.append(Counter(host_syncs))
    assert counts[0] == counts[1]


@pytest.mark.parametrize("samples,batch_size", [(5, 10), (5, 320)])
def test_mc_dropout_copies_back_once(samples: int, batch_size: int,
                                     host_syncs: Counter[str]) -> None:
    torch.manual_seed(0)
    model = build_classifier((3, 8, 8), 3, CLASSIFIER_CFG)
    baselines.mc_dropout_probabilities(model, images(64).x, samples, batch_size, CPU)
    assert sum(host_syncs.values()) == 1, dict(host_syncs)


# ---------------------------------------------------------------- precision, channels_last


def test_compute_defaults_to_fp32_contiguous_and_is_scoped() -> None:
    assert compute() == Compute("fp32", False)
    with computing("bf16", channels_last=True) as inside:
        assert compute() is inside
        assert inside == Compute("bf16", True)
    assert compute() == Compute()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert compute_params(params) == {"precision": "fp32", "channels_last": False}


def test_an_unknown_precision_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="precision = 'fp16': valid values: fp32, bf16"):
        Compute("fp16")
    assert PRECISIONS == ("fp32", "bf16")


@pytest.mark.parametrize("key,value,message", [
    ("precision", "fp16", "precision = 'fp16': valid values: fp32, bf16"),
    ("precision", "BF16", "precision = 'BF16': valid values: fp32, bf16"),
    ("channels_last", "yes", "channels_last = 'yes': must be true or false"),
    ("channels_last", 1, "channels_last = 1: must be true or false"),
])
def test_params_validation_names_the_valid_values(key: str, value: Any, message: str) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params[key] = value
    with pytest.raises(ParamsError) as error:
        validate(params)
    assert message in str(error.value)


def _states_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> bool:
    return all(torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0) for k in a)


def test_bf16_trains_close_to_fp32_and_differs_from_it() -> None:
    """bf16 autocast on the CPU: the same run trains, lands near the fp32 one (loss and
    accuracy), and is not bit-identical to it (autocast really ran)."""
    # the MLP: CPUs without bfloat16 instructions run bf16 convolutions very slowly
    cfg = {**CLASSIFIER_CFG, "model": "mlp", "hidden": 64, "epochs": 3}
    fp32, _ = classifier_run(256, cfg, augment=None)
    with computing("bf16"):
        bf16, model = classifier_run(256, cfg, augment=None)
    last32, last16 = fp32.history[-1], bf16.history[-1]
    assert last32["val_accuracy"] > 0.7  # the task is learnt
    assert abs(last16["val_accuracy"] - last32["val_accuracy"]) <= 0.1
    assert abs(last16["train_loss"] - last32["train_loss"]) <= 0.05
    assert last16["train_loss"] != last32["train_loss"]
    # weights stay float32; only the forward passes are bfloat16
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_predictions_are_close_to_fp32() -> None:
    torch.manual_seed(0)
    model = build_classifier((3, 8, 8), 3, CLASSIFIER_CFG)
    x = images(64).x
    fp32 = predict(model, x, 16, CPU)
    with computing("bf16"):
        bf16 = predict(model, x, 16, CPU)
    assert bf16.dtype == torch.float32
    assert not torch.equal(bf16, fp32)
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.05)


def test_channels_last_trains_to_the_same_weights() -> None:
    """channels_last changes the memory order of images and convolution weights, not the
    arithmetic: the same run, augmentation included, to float32 rounding. Dropout is off:
    its masks are drawn in memory order, so a channels-last run draws other (equally
    random) masks."""
    plain, _ = classifier_run(64, dropout=False)
    with computing(channels_last=True):
        last, model = classifier_run(64, dropout=False)
    conv = model.get_parameter("conv_stack.block1.conv1.weight")
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    # other summation orders in the convolutions, amplified by batch-norm over 16 images of
    # 1x1 pixels in the last block: ~1e-5 on the loss, ~1e-3 on the weights after 4 steps
    assert abs(plain.history[-1]["train_loss"] - last.history[-1]["train_loss"]) < 1e-3
    assert _states_close(plain.best_state, last.best_state, atol=5e-3)


def test_augmentation_keeps_the_memory_format_and_the_values() -> None:
    x = images(16).x
    generator_state = torch.Generator().manual_seed(3).get_state()
    plain = AUGMENT(x, torch.Generator().set_state(generator_state))
    last = AUGMENT(x.contiguous(memory_format=torch.channels_last),
                   torch.Generator().set_state(generator_state))
    assert last.is_contiguous(memory_format=torch.channels_last) and not last.is_contiguous()
    assert plain.is_contiguous()
    assert torch.equal(plain, last)


def test_place_moves_images_once_and_leaves_other_tensors() -> None:
    x, features = images(4).x, torch.randn(4, 5)
    assert Compute().place(x, CPU) is x  # already there: no copy
    placed = Compute(channels_last=True).place(x, CPU)
    assert placed.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(placed, x)
    assert Compute(channels_last=True).place(features, CPU) is features


# -------------------------------------------------------------------------- faiss on GPU


@pytest.fixture
def fresh_notice() -> Iterator[None]:
    baselines._say_faiss_has_no_gpu.cache_clear()
    yield
    baselines._say_faiss_has_no_gpu.cache_clear()


@pytest.mark.parametrize("device,gpus,backend", [
    ("cpu", 0, "cpu"), ("cpu", 2, "cpu"), ("cuda", 1, "gpu"), ("cuda:1", 2, "gpu"),
    (torch.device("cuda", 0), 1, "gpu")])
def test_faiss_runs_on_the_gpu_only_for_a_cuda_device_and_a_gpu_build(
        device: Any, gpus: int, backend: str, fresh_notice: None,
        capsys: pytest.CaptureFixture[str]) -> None:
    assert baselines.faiss_backend(device, gpus) == backend
    assert capsys.readouterr().err == ""


def test_a_cpu_faiss_on_a_cuda_device_says_so_once(
        fresh_notice: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert baselines.faiss_backend("cuda", 0) == "cpu"
    assert baselines.faiss_backend("cuda:0", 0) == "cpu"
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    assert "no GPU support" in lines[0] and "faiss-gpu" in lines[0]


def test_the_cpu_index_is_exact_flat_l2() -> None:
    import faiss

    index = baselines.flat_l2_index(7, CPU)
    assert isinstance(index, faiss.IndexFlatL2)
    assert index.d == 7


# ------------------------------------------------------------------------------ CUDA only

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
def test_a_cuda_epoch_syncs_once() -> None:
    """On CUDA, torch itself reports every synchronising call: one epoch of augmented
    batches makes one, the read of its summed loss at the end."""
    import warnings

    from pipeline.training import train_one_epoch

    cuda = torch.device("cuda")
    torch.manual_seed(0)
    model = build_classifier((3, 8, 8), 3, CLASSIFIER_CFG).to(cuda)
    train = images(128)
    x, y = train.x.to(cuda), train.y.to(cuda)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    generator = torch.Generator().manual_seed(0)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(model(AUGMENT(x[idx], generator)), y[idx])

    train_one_epoch(model, optimiser, len(train), 16, generator, batch_loss, cuda)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_one_epoch(model, optimiser, len(train), 16, generator, batch_loss, cuda)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, syncs


@needs_cuda
def test_cuda_faiss_index_gives_the_cpu_distances() -> None:
    import faiss
    import numpy as np

    if faiss.get_num_gpus() == 0:
        pytest.skip("faiss is a CPU build")
    rng = np.random.default_rng(0)
    features = rng.normal(size=(500, 16)).astype(np.float32)
    labels = rng.integers(0, 3, 500)
    queries = rng.normal(size=(100, 16)).astype(np.float32)
    on_gpu = baselines.second_neighbour_distances(features, labels, queries, 3, "cuda")
    on_cpu = baselines.second_neighbour_distances(features, labels, queries, 3, "cpu")
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-4)
