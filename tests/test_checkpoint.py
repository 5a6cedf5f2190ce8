"""Interrupted training resumes from its last per-epoch checkpoint and ends exactly where
an uninterrupted run ends (on CPU); checkpoints of other params or inputs are discarded.

Unit tests interrupt a loop by raising from its epoch logger; the slow end-to-end test
SIGKILLs the real ``train_classifier`` stage in a temporary project."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO, UNTRACKED, fast_params, make_project, run, subprocess_env

from pipeline.augment import Augmentation
from pipeline.checkpoint import Checkpointer, fingerprint, stage_fingerprint
from pipeline.data import Split
from pipeline.losses import LOSSES
from pipeline.models import MLP, ConfidNetHead
from pipeline.training import ConfidenceData, FitResult, fit_confidence, train_classifier

CPU = torch.device("cpu")
EPOCHS = 6
# A learning-rate drop and augmentation, so a resume must restore the schedule and the
# generator that draws the augmentations too.
CLASSIFIER_CFG = {"epochs": EPOCHS, "batch_size": 32, "lr": 0.05, "momentum": 0.9,
                  "weight_decay": 1e-4, "milestones": [3], "gamma": 0.5}
AUGMENT = Augmentation(hflip=True, crop_padding=1, pad_value=(-0.5,))


class Interrupt(Exception):
    pass


def logger(rows: list[tuple[int, dict[str, float]]],
           stop_at: int | None = None) -> Callable[[int, dict[str, float]], None]:
    """An epoch logger that records what it gets and raises at epoch ``stop_at``."""

    def log(epoch: int, row: dict[str, float]) -> None:
        if epoch == stop_at:
            raise Interrupt
        rows.append((epoch, row))

    return log


def digits_like(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))


TRAIN, VAL = digits_like(160, 1), digits_like(60, 2)


def fit_classifier(checkpointer: Checkpointer | None, init_seed: int = 0,
                   stop_at: int | None = None,
                   rows: list[tuple[int, dict[str, float]]] | None = None,
                   ) -> tuple[MLP, FitResult]:
    """A fresh MLP (with dropout, so the global RNG matters) trained on random digits.
    ``init_seed`` seeds its initialisation and the global RNG."""
    torch.manual_seed(init_seed)
    model = MLP((1, 8, 8), 10, hidden=32, dropout=0.3)
    result = train_classifier(model, TRAIN, VAL, CLASSIFIER_CFG, CPU, seed=0,
                              log=logger([] if rows is None else rows, stop_at),
                              checkpointer=checkpointer, augment=AUGMENT)
    return model, result


def confidence_data(n: int, seed: int) -> ConfidenceData:
    g = torch.Generator().manual_seed(seed)
    correct = (torch.arange(n) % 3 != 0).float()  # both classes present
    return ConfidenceData(torch.randn(n, 16, generator=g), torch.rand(n, generator=g), correct)


CONF_TRAIN, CONF_VAL = confidence_data(150, 3), confidence_data(60, 4)


def fit_head(checkpointer: Checkpointer | None, init_seed: int = 0,
             stop_at: int | None = None,
             rows: list[tuple[int, dict[str, float]]] | None = None,
             ) -> tuple[ConfidNetHead, FitResult]:
    torch.manual_seed(init_seed)
    head = ConfidNetHead(16, width=24, layers=2)
    result = fit_confidence(head, CONF_TRAIN, CONF_VAL, LOSSES["mse"], {}, epochs=EPOCHS,
                            lr=1e-2, batch_size=32, device=CPU, seed=0,
                            log=logger([] if rows is None else rows, stop_at), desc="test",
                            checkpointer=checkpointer)
    return head, result


FITS = {"train_classifier": fit_classifier, "fit_confidence": fit_head}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_fit(a: tuple[torch.nn.Module, FitResult],
                    b: tuple[torch.nn.Module, FitResult]) -> None:
    (model_a, result_a), (model_b, result_b) = a, b
    assert_same_state(model_a.state_dict(), model_b.state_dict())
    assert_same_state(result_a.best_state, result_b.best_state)
    assert result_a.history == result_b.history
    assert (result_a.best_epoch, result_a.best_value) == (result_b.best_epoch,
                                                          result_b.best_value)


# ------------------------------------------------------------------- resume, unit level


@pytest.mark.parametrize("fit", FITS.values(), ids=FITS.keys())
@pytest.mark.parametrize("stop_at", [2, 4, EPOCHS])
def test_interrupted_fit_resumes_to_identical_weights(
        fit: Callable[..., tuple[torch.nn.Module, FitResult]], stop_at: int, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    reference = fit(None)
    checkpointer = Checkpointer("stage", "fp", root=tmp_path)
    with pytest.raises(Interrupt):
        fit(checkpointer, stop_at=stop_at)
    saved = torch.load(checkpointer.path, map_location="cpu", weights_only=True)
    assert saved["epoch"] == stop_at - 1

    # a fresh model with another initialisation and another global RNG state: the
    # checkpoint must restore everything that matters
    rows: list[tuple[int, dict[str, float]]] = []
    resumed = fit(Checkpointer("stage", "fp", root=tmp_path), init_seed=123, rows=rows)
    assert_same_fit(resumed, reference)
    assert (f"resuming stage from epoch {stop_at} of {EPOCHS} ({tmp_path / 'stage'})"
            in capsys.readouterr().err)
    # epochs done before the interruption are logged again, then the rest
    assert [epoch for epoch, _ in rows] == list(range(1, EPOCHS + 1))
    assert [{"epoch": e, **row} for e, row in rows] == [
        row for row in reference[1].history if row["epoch"] > 0]


@pytest.mark.parametrize("fit", FITS.values(), ids=FITS.keys())
def test_finished_but_uncleared_checkpoint_trains_no_further(
        fit: Callable[..., tuple[torch.nn.Module, FitResult]], tmp_path: Path) -> None:
    """Killed after the last epoch but before the outputs were written: the rerun only
    restores the result."""
    checkpointer = Checkpointer("stage", "fp", root=tmp_path)
    first = fit(checkpointer)
    saved = torch.load(checkpointer.path, map_location="cpu", weights_only=True)
    assert saved["epoch"] == EPOCHS
    assert_same_fit(fit(checkpointer, init_seed=7), first)


def test_checkpoint_holds_the_full_state_and_loads_weights_only(tmp_path: Path) -> None:
    checkpointer = Checkpointer("stage", "fp", root=tmp_path)
    with pytest.raises(Interrupt):
        fit_head(checkpointer, stop_at=3)
    saved = torch.load(checkpointer.path, map_location="cpu", weights_only=True)
    assert saved["fingerprint"] == "fp"
    state = saved["state"]
    assert {"model", "optimiser", "generator", "torch_rng", "result"} <= state.keys()
    assert state["generator"].dtype == torch.uint8
    assert [row["epoch"] for row in state["result"]["history"]] == [0, 1, 2]
    assert checkpointer.load() is not None
    assert [p.name for p in checkpointer.folder.iterdir()] == ["checkpoint.pt"]


# --------------------------------------------------------------- discard, clear, fingerprint


def test_mismatched_fingerprint_is_discarded(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(Interrupt):
        fit_classifier(Checkpointer("stage", "old params", root=tmp_path), stop_at=3)
    checkpointer = Checkpointer("stage", "new params", root=tmp_path)
    assert checkpointer.load() is None
    assert "discarding the checkpoint" in capsys.readouterr().err
    assert not checkpointer.folder.exists()

    with pytest.raises(Interrupt):
        fit_classifier(Checkpointer("stage", "old params", root=tmp_path), stop_at=3)
    fresh = fit_classifier(Checkpointer("stage", "new params", root=tmp_path))
    assert_same_fit(fresh, fit_classifier(None))  # trained from scratch
    assert "resuming" not in capsys.readouterr().err


def test_unreadable_checkpoint_is_discarded(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    checkpointer = Checkpointer("stage", "fp", root=tmp_path)
    checkpointer.folder.mkdir(parents=True)
    checkpointer.path.write_bytes(b"not a checkpoint")
    assert checkpointer.load() is None
    assert "cannot be read" in capsys.readouterr().err
    assert not checkpointer.folder.exists()


def test_clear_removes_the_folder(tmp_path: Path) -> None:
    checkpointer = Checkpointer("stage", "fp", root=tmp_path)
    checkpointer.clear()  # nothing there yet: fine
    checkpointer.save(1, {"x": torch.ones(2)})
    assert checkpointer.path.exists()
    checkpointer.clear()
    assert not checkpointer.folder.exists()
    assert tmp_path.exists()
    assert checkpointer.load() is None


def test_default_folder_is_relative_to_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    checkpointer = Checkpointer("train_classifier", "fp")
    checkpointer.save(3, {"x": torch.zeros(1)})
    assert (tmp_path / ".checkpoints" / "train_classifier" / "checkpoint.pt").is_file()
    loaded = checkpointer.load()
    assert loaded is not None and loaded[0] == 3


def test_fingerprint_follows_params_and_input_content(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.npz").write_bytes(b"1")
    model = tmp_path / "model.pt"
    model.write_bytes(b"w")
    base = fingerprint("s", {"lr": 0.1}, [data, model])
    assert fingerprint("s", {"lr": 0.1}, [data, model]) == base
    assert fingerprint("t", {"lr": 0.1}, [data, model]) != base
    assert fingerprint("s", {"lr": 0.2}, [data, model]) != base
    (data / "a.npz").write_bytes(b"2")
    assert fingerprint("s", {"lr": 0.1}, [data, model]) != base
    (data / "a.npz").write_bytes(b"1")
    (data / "b.npz").write_bytes(b"")
    assert fingerprint("s", {"lr": 0.1}, [data, model]) != base
    (data / "b.npz").unlink()
    model.unlink()
    assert fingerprint("s", {"lr": 0.1}, [data, model]) != base


def test_stage_fingerprint_reads_the_stage_entry_of_dvc_yaml(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {
        "cmd": "python -m stages.train",
        "deps": ["code.py", "data"],
        "params": ["seed", "model.lr"],
    }}}))
    Path("code.py").write_text("x = 1\n")
    Path("data").mkdir()
    Path("data/d.npz").write_bytes(b"d")
    params: dict[str, Any] = {"seed": 0, "model": {"lr": 0.1, "other": 1}, "unrelated": 2}
    base = stage_fingerprint("train", params)

    def changed(edit: Callable[[dict[str, Any]], None]) -> bool:
        p = copy.deepcopy(params)
        edit(p)
        return stage_fingerprint("train", p) != base

    assert not changed(lambda p: p.update(unrelated=3))
    assert not changed(lambda p: p["model"].update(other=5))  # not declared
    assert changed(lambda p: p.update(seed=1))
    assert changed(lambda p: p["model"].update(lr=0.2))
    Path("code.py").write_text("x = 2\n")  # code is a dep too
    assert stage_fingerprint("train", params) != base


@pytest.mark.parametrize("stage", ["train_classifier", "train_confidnet", "finetune"])
def test_training_stages_have_a_fingerprint(stage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every param the real stages declare in dvc.yaml exists in params.yaml."""
    monkeypatch.chdir(REPO)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert len(Checkpointer.for_stage(stage, params).fingerprint) == 64


# ------------------------------------------------------------------ SIGKILL, end to end

KILL_EPOCHS = 100  # ~20 epochs/s on one CPU thread: seconds of training to kill into


def checkpoint_epoch(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except (OSError, RuntimeError, EOFError, KeyError):
        return 0


def kill_when_checkpointed(project: Path, min_epoch: int, timeout: float = 60) -> int:
    """Start train_classifier, SIGKILL it once its checkpoint is at ``min_epoch`` or
    later; returns that epoch."""
    path = project / ".checkpoints" / "train_classifier" / "checkpoint.pt"
    proc = subprocess.Popen([sys.executable, "-m", "stages.train_classifier"], cwd=project,
                            env=subprocess_env(UNTRACKED), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    epoch = 0
    try:
        while (epoch := checkpoint_epoch(path)) < min_epoch:
            assert proc.poll() is None, f"train_classifier exited {proc.returncode} early"
            assert time.monotonic() < deadline, "no checkpoint in time"
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the stage finished before it was killed"
    return epoch


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_sigkilled_stage_resumes_to_identical_weights(tmp_path: Path) -> None:
    params = fast_params()
    params["classifier"]["epochs"] = KILL_EPOCHS
    params["checkpoint_every_seconds"] = 0
    killed = make_project(tmp_path / "killed", params)
    run(killed, ["python", "-m", "stages.download"], env=UNTRACKED)

    epoch = kill_when_checkpointed(killed, min_epoch=3)
    assert 3 <= epoch < KILL_EPOCHS
    # no output, partial or not, and no temporary file beside the outputs
    for output in ("models/classifier.pt", "metrics/classifier.json",
                   "plots/classifier_curves.csv", "runs/train_classifier.json"):
        assert not (killed / output).exists(), output
    leftovers = [p.relative_to(killed).as_posix() for p in killed.rglob("*.tmp")
                 if p.relative_to(killed).parts[0] not in (".checkpoints", ".git", ".dvc")]
    assert leftovers == []

    resumed = run(killed, ["python", "-m", "stages.train_classifier"], env=UNTRACKED)
    assert "resuming train_classifier from epoch" in resumed.stderr
    assert not (killed / ".checkpoints" / "train_classifier").exists()

    # the same stage, never interrupted, in a project of its own (same data)
    whole = make_project(tmp_path / "whole", params)
    (whole / "data").mkdir()
    for file in (killed / "data").iterdir():
        (whole / "data" / file.name).write_bytes(file.read_bytes())
    done = run(whole, ["python", "-m", "stages.train_classifier"], env=UNTRACKED)
    assert "resuming" not in done.stderr
    assert not (whole / ".checkpoints" / "train_classifier").exists()

    ours, theirs = (load_weights(p / "models" / "classifier.pt") for p in (killed, whole))
    assert_same_state(ours, theirs)
    for name in ("metrics/classifier.json", "plots/classifier_curves.csv"):
        assert (killed / name).read_text() == (whole / name).read_text(), name


def test_saving_is_throttled_to_the_configured_interval(tmp_path: Path) -> None:
    every_epoch = Checkpointer("stage", "fp", root=tmp_path, every_seconds=0.0)
    assert every_epoch.due()
    every_epoch.save(1, {"x": torch.zeros(1)})
    assert every_epoch.due()
    hourly = Checkpointer("stage", "fp", root=tmp_path, every_seconds=3600.0)
    assert not hourly.due()  # the clock starts with the run, not with the first save
    hourly.save(2, {"x": torch.zeros(1)})
    assert not hourly.due()
