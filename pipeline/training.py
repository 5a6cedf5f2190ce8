"""Training loops. Device-agnostic, so the same loops run on CPU here and on a GPU machine:
each loop moves its whole splits to ``device`` once (:meth:`~pipeline.runtime.Compute.place`)
and its batches are index slices of them there, augmented there; the random draws (batch
order, augmentations) still come from CPU generators, so a seed gives the same draws on any
device. Inside an epoch nothing waits for the device: losses are summed on the device and
read once per epoch, and predictions are copied back once per pass (``tests/test_gpu_path.py``
counts host syncs). Forward passes run under the stage's :func:`~pipeline.runtime.computing`
settings (``precision``, ``channels_last``). Under torchrun they train with
DistributedDataParallel, each process on its share of every batch
(:mod:`pipeline.distributed`, whose docstring says how batches are shared and seeded);
with one process they are exactly the one-process loops."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline import distributed
from pipeline.augment import Augmentation, flip_pairs
from pipeline.checkpoint import Checkpointer
from pipeline.metrics import aupr_error
from pipeline.prepared import Split
from pipeline.runtime import (  # noqa: F401  (resolve_device, seed_everything: re-exported)
    compute,
    resolve_device,
    seed_everything,
)

EpochLogger = Callable[[int, dict[str, float]], None]


def batches(n: int, batch_size: int, generator: torch.Generator | None,
            device: torch.device | None = None) -> list[torch.Tensor]:
    """Index batches; shuffled when a generator is given (drawn on the CPU, from
    ``generator``), then moved to ``device`` in one copy that does not wait for it."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    if device is not None:
        order = order.to(device, non_blocking=True)
    return list(order.split(batch_size))


@torch.no_grad()
def predict(model: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
            batch_size: int, device: torch.device) -> torch.Tensor:
    """Outputs for ``inputs`` in eval mode, as float32 on the CPU: ``inputs`` moved to
    ``device`` once (a no-op when they are there), the outputs gathered there and copied
    back once."""
    if isinstance(model, nn.Module):
        model.eval()
    settings = compute()
    inputs = settings.place(inputs, device)
    with settings.autocast(device):
        outputs = [model(inputs[idx]).float()
                   for idx in batches(len(inputs), batch_size, None, device)]
    return torch.cat(outputs).cpu()


def predict_shared(model: nn.Module, inputs: torch.Tensor, batch_size: int,
                   device: torch.device) -> torch.Tensor:
    """:func:`predict`, each training process predicting its share of the rows and all of
    them getting every row: a collective, so every process calls it (inside a training
    loop). ``model`` is the bare model, never its DDP wrapper."""
    here = distributed.group()
    if here.size == 1:
        return predict(model, inputs, batch_size, device)
    mine = predict(model, inputs[distributed.rows(len(inputs), here)], batch_size, device)
    return distributed.gather_rows(mine, len(inputs))


def confidence_scores(model: nn.Module, inputs: torch.Tensor, device: torch.device,
                      shared: bool = False) -> np.ndarray:
    """ConfidNet's confidence ``sigmoid(u)`` for every input, as float64 numpy; with
    ``shared``, computed by every training process together (:func:`predict_shared`)."""
    outputs = (predict_shared if shared else predict)(model, inputs, 4096, device)
    return torch.sigmoid(outputs).double().numpy()


# Images per forward pass when a segmentation model is evaluated (no gradient).
SEGMENTATION_EVAL_BATCH = 8


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int,
                     void_label: int | None) -> torch.Tensor:
    """(K, K) int64 counts, rows the true class and columns the predicted one, of every
    pixel whose label is not ``void_label``."""
    keep = (labels != void_label if void_label is not None
            else torch.ones_like(labels, dtype=torch.bool))
    pairs = labels[keep] * num_classes + predictions[keep]
    return torch.bincount(pairs.flatten().cpu(), minlength=num_classes ** 2).view(
        num_classes, num_classes)


def pixel_accuracy_and_miou(confusion: torch.Tensor) -> tuple[float, float]:
    """Pixel accuracy and mean IoU (over the classes present in the labels or the
    predictions) of a confusion matrix."""
    confusion = confusion.double()
    total = float(confusion.sum())
    accuracy = float(confusion.diag().sum()) / total if total else float("nan")
    union = confusion.sum(0) + confusion.sum(1) - confusion.diag()
    present = union > 0
    miou = float((confusion.diag()[present] / union[present]).mean()) if bool(present.any()) \
        else float("nan")
    return accuracy, miou


@torch.no_grad()
def segmentation_evaluation(model: nn.Module, split: Split, num_classes: int,
                            void_label: int | None, device: torch.device) -> dict[str, float]:
    """Pixel accuracy, mean IoU and mean cross-entropy (void pixels ignored) of a
    segmentation model over ``split``, image batch by image batch (nothing per pixel is
    kept)."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss, pixels = 0.0, 0
    ignore = -100 if void_label is None else void_label
    for idx in batches(len(split), SEGMENTATION_EVAL_BATCH, None):
        logits = model(split.x[idx].to(device)).float()
        labels = split.y[idx].to(device)
        loss += float(nn.functional.cross_entropy(logits, labels, ignore_index=ignore,
                                                  reduction="sum"))
        pixels += int((labels != ignore).sum())
        confusion += confusion_matrix(logits.argmax(1), labels, num_classes, void_label)
    accuracy, miou = pixel_accuracy_and_miou(confusion)
    return {"accuracy": accuracy, "miou": miou, "loss": loss / max(pixels, 1)}


def make_optimiser(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """``classifier.optimizer``: SGD with momentum (the classification settings) or Adam
    (CamVid's SegNet); both with ``weight_decay``."""
    if cfg.get("optimizer", "sgd") == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg["lr"],
                                weight_decay=cfg["weight_decay"], foreach=True)
    return torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                           weight_decay=cfg["weight_decay"], foreach=True)


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_value: float
    history: list[dict[str, float]] = field(default_factory=list)

    def record(self, epoch: int, row: dict[str, float], selection_key: str, model: nn.Module,
               log: EpochLogger) -> None:
        """Log an epoch and keep the model's weights if ``row[selection_key]`` is the best."""
        self.history.append({"epoch": epoch, **row})
        log(epoch, row)
        if row[selection_key] > self.best_value:
            self.best_value, self.best_epoch = row[selection_key], epoch
            self.best_state = copy.deepcopy(model.state_dict())


def train_one_epoch(model: nn.Module, optimiser: torch.optim.Optimizer, n: int,
                    batch_size: int, generator: torch.Generator,
                    batch_loss: Callable[[torch.Tensor], torch.Tensor],
                    device: torch.device | None = None) -> float:
    """One pass over ``n`` samples in shuffled batches (their indices on ``device``);
    returns the mean training loss. Under DDP (``model`` wrapped by
    :func:`distributed.wrap`) the batches are global: every process draws the same order
    from ``generator`` and trains on its share of each batch, its mean loss weighted so
    that the averaged gradient is the whole batch's.

    The loss is summed on the device, in float64 (the arithmetic of summing Python floats,
    so the figure is the one a per-batch ``.item()`` gave), and read once, at the end: no
    batch waits for the one before it to finish."""
    model.train()
    here = distributed.group()
    total: torch.Tensor | None = None
    for idx in batches(n, batch_size, generator, device):
        mine, weight = distributed.share(idx, here)
        loss = batch_loss(mine)
        optimiser.zero_grad(set_to_none=True)
        (loss if here.size == 1 else loss * weight).backward()
        optimiser.step()
        if weight > 0:
            term = loss.detach().double() * len(mine)
            total = term if total is None else total + term
    summed = 0.0 if total is None else float(total)  # the epoch's one host sync
    return distributed.sum_over_processes(summed) / n


def _progress(epochs: int, desc: str, done: int = 0) -> tqdm:
    return tqdm(range(done + 1, epochs + 1), desc=desc, unit="epoch", mininterval=1.0,
                leave=False, initial=done, total=epochs, disable=not distributed.is_main())


def _no_log(epoch: int, row: dict[str, float]) -> None:
    """The epoch logger of processes other than 0: only process 0 tracks the run."""


def _process_rng(draws: torch.Generator) -> dict[str, Any]:
    """This process's own random state under DDP: its generator of sample draws and
    torch's global generator (CPU and CUDA)."""
    state: dict[str, Any] = {"draws": draws.get_state(), "torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any], draws: torch.Generator | None = None) -> None:
    """Restore torch's global generators from ``state`` (and ``draws``, under DDP). CUDA
    states are restored only where the same number of GPUs is visible."""
    if draws is not None:
        draws.set_state(state["draws"])
    torch.set_rng_state(state["torch_rng"])
    cuda_rng = state.get("cuda_rng")
    if cuda_rng is not None and torch.cuda.is_available() \
            and len(cuda_rng) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_rng)


def _training_state(model: nn.Module, optimiser: torch.optim.Optimizer,
                    generator: torch.Generator, result: FitResult,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    processes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything an epoch boundary depends on: weights, optimiser, learning-rate schedule,
    the generator of batch order and augmentations, torch's global RNG (dropout) and the
    result so far. The loops draw from no Python or numpy RNG, so those are not saved.
    Under DDP, ``processes`` holds each process's own random state, by rank
    (:func:`_process_rng`)."""
    state: dict[str, Any] = {
        "model": model.state_dict(),
        "optimiser": optimiser.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "result": {"best_state": result.best_state, "best_epoch": result.best_epoch,
                   "best_value": result.best_value, "history": result.history},
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    if processes is not None:
        state["processes"] = processes
    return state


def _resume(checkpointer: Checkpointer | None, model: nn.Module,
            optimiser: torch.optim.Optimizer, generator: torch.Generator, epochs: int,
            log: EpochLogger, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
            draws: torch.Generator | None = None) -> tuple[int, FitResult | None]:
    """Restore the last checkpoint, if any: ``(epochs done, result so far)``, else
    ``(0, None)``. Epochs already done are logged again, so a fresh tracking run still
    gets the whole curve. Under DDP (``checkpointer`` given to every process), process 0
    reads the checkpoint and sends it to the others, each of which restores its own
    random state (generator ``draws`` and torch's); a checkpoint of another number of
    processes is not resumed."""
    here = distributed.group()
    loaded = checkpointer.load() if checkpointer is not None and here.main else None
    if checkpointer is not None and here.size > 1:
        loaded = distributed.broadcast(loaded)
    if checkpointer is None or loaded is None:
        return 0, None
    done, state = loaded
    saved_size = len(state.get("processes") or [None])
    if saved_size != here.size:
        if here.main:
            sys.stderr.write(f"{checkpointer.stage}: not resuming the checkpoint in "
                             f"{checkpointer.folder}: it was made by {saved_size} "
                             f"process(es), this run has {here.size}\n")
        return 0, None
    model.load_state_dict(state["model"])
    optimiser.load_state_dict(state["optimiser"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    _restore_rng(state if here.size == 1 else state["processes"][here.rank],
                 None if here.size == 1 else draws)
    result = FitResult(**state["result"])
    if here.main:
        sys.stderr.write(f"resuming {checkpointer.stage} from epoch {done + 1} of {epochs} "
                         f"({checkpointer.folder})\n")
    for row in result.history:
        if row["epoch"] > 0:
            log(int(row["epoch"]), {k: v for k, v in row.items() if k != "epoch"})
    return done, result


def _fit_epochs(model: nn.Module, optimiser: torch.optim.Optimizer,
                generator: torch.Generator, epochs: int, desc: str, log: EpochLogger,
                checkpointer: Checkpointer | None, start: Callable[[], FitResult],
                run_epoch: Callable[[], dict[str, float]], selection_key: str,
                scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                draws: torch.Generator | None = None) -> FitResult:
    """The skeleton both loops share: resume from ``checkpointer``'s last checkpoint (else
    begin from ``start()``), then for each remaining epoch, with a progress bar, train and
    measure it (``run_epoch()``, the loop's own part), log it, keep the weights if
    ``row[selection_key]`` is the best so far and save a checkpoint when one is due.

    Under DDP every process runs this (``model`` is the bare model, ``draws`` the
    process's generator of sample draws) and computes the same rows; process 0 alone
    logs and saves checkpoints, holding every process's random state."""
    here = distributed.group()
    log = log if here.main else _no_log
    done, result = _resume(checkpointer, model, optimiser, generator, epochs, log, scheduler,
                           draws)
    if result is None:
        result = start()
    for epoch in _progress(epochs, desc, done):
        result.record(epoch, run_epoch(), selection_key, model, log)
        if checkpointer is None:
            continue
        # a collective: every process sends its random state whether or not one is due
        processes = (distributed.gather(_process_rng(draws or generator))
                     if here.size > 1 else None)
        if here.main and checkpointer.due():
            checkpointer.save(epoch, _training_state(model, optimiser, generator, result,
                                                     scheduler, processes))
    return result


def train_classifier(model: nn.Module, train: Split, val: Split, cfg: dict[str, Any],
                     device: torch.device, seed: int, log: EpochLogger,
                     checkpointer: Checkpointer | None = None,
                     augment: Augmentation | None = None, num_classes: int = 0,
                     void_label: int | None = None) -> FitResult:
    """Cross-entropy training with SGD or Adam (paper eq. 1), the learning rate multiplied
    by ``gamma`` at each of ``milestones`` (the authors' CIFAR-100 schedule); keeps the
    epoch with the best validation accuracy, as the authors do. ``augment`` applies to
    training batches only: validation accuracy is measured on the images as they are. With
    a ``checkpointer``, resumes from its last checkpoint and saves one after every epoch.
    The splits move to ``device`` once; batches are augmented there.

    A segmentation model (``model.per_pixel``, ``num_classes`` classes) is trained on
    every pixel but ``void_label`` (ignored by the cross-entropy), its images and label
    maps flipped together when ``augment.hflip``; its epoch is kept on the validation mean
    IoU, its pixel accuracy logged as ``*_accuracy``."""
    settings = compute()
    settings.prepare(model, device)
    train_x, train_y = settings.place(train.x, device), train.y.to(device)
    placed = {"train": train_x, "val": settings.place(val.x, device)}
    optimiser = make_optimiser(model, cfg)
    per_pixel = bool(getattr(model, "per_pixel", False))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones=cfg["milestones"],
                                                     gamma=cfg["gamma"])
    generator, draws = distributed.generators(seed)
    net = distributed.wrap(model, device, sync_batchnorm=True)

    ignore = -100 if void_label is None else void_label

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        x, y = train_x[idx], train_y[idx]
        if per_pixel and augment is not None and augment.hflip:
            x, y = flip_pairs(x, y, draws)
        elif augment is not None:
            x = augment(x, draws)
        with settings.autocast(device):
            logits = net(x)
        return nn.functional.cross_entropy(logits.float(), y, ignore_index=ignore)

    def run_epoch() -> dict[str, float]:
        row = {"lr": optimiser.param_groups[0]["lr"],
               "train_loss": train_one_epoch(net, optimiser, len(train), cfg["batch_size"],
                                             generator, batch_loss, device)}
        scheduler.step()
        if per_pixel:
            for name, split in (("train", train), ("val", val)):
                scores = segmentation_evaluation(model, split, num_classes, void_label, device)
                row[f"{name}_accuracy"], row[f"{name}_miou"] = scores["accuracy"], scores["miou"]
            row["val_loss"] = scores["loss"]
            return row
        for name, split in (("train", train), ("val", val)):
            logits = predict_shared(model, placed[name], 4096, device)
            row[f"{name}_accuracy"] = float((logits.argmax(1) == split.y).float().mean())
        # `logits` are the validation ones now: one pass serves accuracy and loss
        row["val_loss"] = float(nn.functional.cross_entropy(logits, val.y))
        return row

    def start() -> FitResult:
        return FitResult(copy.deepcopy(model.state_dict()), 0, -1.0)

    return _fit_epochs(model, optimiser, generator, cfg["epochs"], "train classifier", log,
                       checkpointer, start, run_epoch,
                       "val_miou" if per_pixel else "val_accuracy", scheduler, draws)


@dataclass(frozen=True)
class ConfidenceData:
    """Inputs of the confidence model with its targets, for one split."""

    inputs: torch.Tensor  # features (phase 1) or images (fine-tuning)
    target: torch.Tensor  # criterion value (TCP or TCP^r) of the frozen classifier
    correct: torch.Tensor  # 1 where the frozen classifier is right
    labels: torch.Tensor | None = None  # true classes, for targets recomputed per batch


# Augments a batch of images and recomputes its targets from the frozen classifier:
# (images, labels, generator) -> (inputs, target, correct). See features.AugmentedTargets.
Relabel = Callable[[torch.Tensor, torch.Tensor, torch.Generator],
                   tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def fit_confidence(model: nn.Module, train: ConfidenceData, val: ConfidenceData,
                   loss_fn: Callable[..., torch.Tensor], loss_kwargs: dict[str, float],
                   epochs: int, lr: float, batch_size: int, device: torch.device, seed: int,
                   log: EpochLogger, desc: str,
                   checkpointer: Checkpointer | None = None,
                   relabel: Relabel | None = None,
                   val_scores: Callable[[], np.ndarray] | None = None) -> FitResult:
    """Train a model that maps inputs to a confidence logit (Adam, as the authors do);
    keep the epoch with the best validation AUPR-Error. Epoch 0 is the starting point,
    so fine-tuning can never end worse on validation than where it began. With
    ``relabel``, each training batch is augmented and its targets recomputed (``train``
    must then carry ``labels``); validation is never augmented. With a ``checkpointer``,
    resumes from its last checkpoint and saves one after every epoch.

    Segmentation: ``relabel`` gives per-pixel targets, ``correct`` -1 on void pixels, which
    the loss leaves out; ``val_scores()`` gives the validation confidences of the pixels
    ``val.correct`` lists (computed image by image), in place of ``model(val.inputs)``."""
    if relabel is not None and train.labels is None:
        raise ValueError("relabel needs the training labels (ConfidenceData.labels)")
    settings = compute()
    settings.prepare(model, device)
    # the training tensors and the validation inputs move to the device once
    train_inputs, val_inputs = settings.place(train.inputs, device), settings.place(val.inputs,
                                                                                    device)
    train_target, train_correct = train.target.to(device), train.correct.to(device)
    train_labels = train.labels.to(device) if train.labels is not None else None
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr,
                                 foreach=True)
    generator, draws = distributed.generators(seed)
    net = distributed.wrap(model, device, static_graph=True)

    def validate() -> float:
        scores = (confidence_scores(model, val_inputs, device, shared=True)
                  if val_scores is None else val_scores())
        value = aupr_error(scores, val.correct.cpu().numpy())
        return -1.0 if np.isnan(value) else value

    def start() -> FitResult:
        value = validate()
        return FitResult(copy.deepcopy(model.state_dict()), 0, value,
                         [{"epoch": 0, "val_aupr_error": value}])

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        inputs = train_inputs[idx]
        with settings.autocast(device):
            if relabel is None or train_labels is None:
                target, correct = train_target[idx], train_correct[idx]
            else:
                inputs, target, correct = relabel(inputs, train_labels[idx], draws)
            output = net(inputs)
        output = output.float()
        if correct.dim() > 1:  # per pixel: void pixels (correct -1) weigh 0 in the loss;
            # selecting the others instead would sync with the host (a data-dependent size)
            return loss_fn(output, target, correct.clamp(min=0),
                           weight=(correct >= 0).to(output.dtype), **loss_kwargs)
        return loss_fn(output, target, correct, **loss_kwargs)

    def run_epoch() -> dict[str, float]:
        return {"train_loss": train_one_epoch(net, optimiser, len(train.inputs), batch_size,
                                              generator, batch_loss, device),
                "val_aupr_error": validate()}

    return _fit_epochs(model, optimiser, generator, epochs, desc, log, checkpointer, start,
                       run_epoch, "val_aupr_error", draws=draws)
