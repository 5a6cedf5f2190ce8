"""Training loops. Device-agnostic: tensors move to ``device`` batch by batch, so the same
loops run on CPU here and on a GPU machine; nothing assumes a single process."""

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

from pipeline.augment import Augmentation
from pipeline.checkpoint import Checkpointer
from pipeline.metrics import aupr_error
from pipeline.prepared import Split
from pipeline.runtime import resolve_device, seed_everything  # noqa: F401  (re-exported)

EpochLogger = Callable[[int, dict[str, float]], None]


def batches(n: int, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    """Index batches; shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    return list(order.split(batch_size))


@torch.no_grad()
def predict(model: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
            batch_size: int, device: torch.device) -> torch.Tensor:
    """Outputs for ``inputs`` in eval mode, gathered on the CPU."""
    if isinstance(model, nn.Module):
        model.eval()
    return torch.cat([model(inputs[idx].to(device)).float().cpu()
                      for idx in batches(len(inputs), batch_size, None)])


def confidence_scores(model: nn.Module, inputs: torch.Tensor, device: torch.device) -> np.ndarray:
    """ConfidNet's confidence ``sigmoid(u)`` for every input, as float64 numpy."""
    return torch.sigmoid(predict(model, inputs, 4096, device)).double().numpy()


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
                    batch_loss: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """One pass over ``n`` samples in shuffled batches; returns the mean training loss."""
    model.train()
    total = 0.0
    for idx in batches(n, batch_size, generator):
        loss = batch_loss(idx)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        total += loss.item() * len(idx)
    return total / n


def _progress(epochs: int, desc: str, done: int = 0) -> tqdm:
    return tqdm(range(done + 1, epochs + 1), desc=desc, unit="epoch", mininterval=1.0,
                leave=False, initial=done, total=epochs)


def _training_state(model: nn.Module, optimiser: torch.optim.Optimizer,
                    generator: torch.Generator, result: FitResult,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                    ) -> dict[str, Any]:
    """Everything an epoch boundary depends on: weights, optimiser, learning-rate schedule,
    the generator of batch order and augmentations, torch's global RNG (dropout) and the
    result so far. The loops draw from no Python or numpy RNG, so those are not saved."""
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
    return state


def _resume(checkpointer: Checkpointer | None, model: nn.Module,
            optimiser: torch.optim.Optimizer, generator: torch.Generator, epochs: int,
            log: EpochLogger, scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
            ) -> tuple[int, FitResult | None]:
    """Restore the last checkpoint, if any: ``(epochs done, result so far)``, else
    ``(0, None)``. Epochs already done are logged again, so a fresh tracking run still
    gets the whole curve."""
    loaded = checkpointer.load() if checkpointer is not None else None
    if checkpointer is None or loaded is None:
        return 0, None
    done, state = loaded
    model.load_state_dict(state["model"])
    optimiser.load_state_dict(state["optimiser"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    cuda_rng = state.get("cuda_rng")
    if cuda_rng is not None and torch.cuda.is_available() \
            and len(cuda_rng) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_rng)
    result = FitResult(**state["result"])
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
                scheduler: torch.optim.lr_scheduler.LRScheduler | None = None) -> FitResult:
    """The skeleton both loops share: resume from ``checkpointer``'s last checkpoint (else
    begin from ``start()``), then for each remaining epoch, with a progress bar, train and
    measure it (``run_epoch()``, the loop's own part), log it, keep the weights if
    ``row[selection_key]`` is the best so far and save a checkpoint when one is due."""
    done, result = _resume(checkpointer, model, optimiser, generator, epochs, log, scheduler)
    if result is None:
        result = start()
    for epoch in _progress(epochs, desc, done):
        result.record(epoch, run_epoch(), selection_key, model, log)
        if checkpointer is not None and checkpointer.due():
            checkpointer.save(epoch, _training_state(model, optimiser, generator, result,
                                                     scheduler))
    return result


def train_classifier(model: nn.Module, train: Split, val: Split, cfg: dict[str, Any],
                     device: torch.device, seed: int, log: EpochLogger,
                     checkpointer: Checkpointer | None = None,
                     augment: Augmentation | None = None) -> FitResult:
    """Cross-entropy training with SGD (paper eq. 1), the learning rate multiplied by
    ``gamma`` at each of ``milestones`` (the authors' CIFAR-100 schedule); keeps the epoch
    with the best validation accuracy, as the authors do. ``augment`` applies to training
    batches only: validation accuracy is measured on the images as they are. With a
    ``checkpointer``, resumes from its last checkpoint and saves one after every epoch."""
    model.to(device)
    optimiser = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"],
                                weight_decay=cfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones=cfg["milestones"],
                                                     gamma=cfg["gamma"])
    generator = torch.Generator().manual_seed(seed)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        x = train.x[idx].to(device)
        if augment is not None:
            x = augment(x, generator)
        return nn.functional.cross_entropy(model(x), train.y[idx].to(device))

    def run_epoch() -> dict[str, float]:
        row = {"lr": optimiser.param_groups[0]["lr"],
               "train_loss": train_one_epoch(model, optimiser, len(train), cfg["batch_size"],
                                             generator, batch_loss)}
        scheduler.step()
        for name, split in (("train", train), ("val", val)):
            logits = predict(model, split.x, 4096, device)
            row[f"{name}_accuracy"] = float((logits.argmax(1) == split.y).float().mean())
        # `logits` are the validation ones now: one pass serves accuracy and loss
        row["val_loss"] = float(nn.functional.cross_entropy(logits, val.y))
        return row

    def start() -> FitResult:
        return FitResult(copy.deepcopy(model.state_dict()), 0, -1.0)

    return _fit_epochs(model, optimiser, generator, cfg["epochs"], "train classifier", log,
                       checkpointer, start, run_epoch, "val_accuracy", scheduler)


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
                   relabel: Relabel | None = None) -> FitResult:
    """Train a model that maps inputs to a confidence logit (Adam, as the authors do);
    keep the epoch with the best validation AUPR-Error. Epoch 0 is the starting point,
    so fine-tuning can never end worse on validation than where it began. With
    ``relabel``, each training batch is augmented and its targets recomputed (``train``
    must then carry ``labels``); validation is never augmented. With a ``checkpointer``,
    resumes from its last checkpoint and saves one after every epoch."""
    if relabel is not None and train.labels is None:
        raise ValueError("relabel needs the training labels (ConfidenceData.labels)")
    model.to(device)
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)

    def validate() -> float:
        value = aupr_error(confidence_scores(model, val.inputs, device), val.correct.numpy())
        return -1.0 if np.isnan(value) else value

    def start() -> FitResult:
        value = validate()
        return FitResult(copy.deepcopy(model.state_dict()), 0, value,
                         [{"epoch": 0, "val_aupr_error": value}])

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        inputs = train.inputs[idx].to(device)
        if relabel is None or train.labels is None:
            target, correct = train.target[idx].to(device), train.correct[idx].to(device)
        else:
            inputs, target, correct = relabel(inputs, train.labels[idx].to(device), generator)
        return loss_fn(model(inputs), target, correct, **loss_kwargs)

    def run_epoch() -> dict[str, float]:
        return {"train_loss": train_one_epoch(model, optimiser, len(train.target), batch_size,
                                              generator, batch_loss),
                "val_aupr_error": validate()}

    return _fit_epochs(model, optimiser, generator, epochs, desc, log, checkpointer, start,
                       run_epoch, "val_aupr_error")
