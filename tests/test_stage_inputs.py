"""Errors that lose nothing: a stage run without its inputs names the missing file and the
command that makes it, and ``check_params`` stops a bad params.yaml before any other stage
runs, saying how to get back. Both exit with status 2 and open no MLflow run.

The slow counterpart, with real `dvc exp run -S loss=foo`, is in test_fresh_clone.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import (
    REPO,
    fast_params,
    subprocess_env,
    without_torch,
    write_conf,
    write_params,
)

from pipeline import artifacts
from pipeline.artifacts import (
    BASELINE_SCORES,
    CONFIDNET_SCORES,
    FEATURES,
    FINETUNED_SCORES,
    PARAMS_CHECKED,
    SCORES,
    STAGE_ORDER,
    STAGES,
    missing_inputs,
    producers,
)
from pipeline.stage import missing_inputs_message

SHIPPED = {artifacts.PAPER_RESULTS, artifacts.REPORT_TEMPLATE, artifacts.CAMVID_MANIFEST}


def test_every_input_is_made_by_an_earlier_stage_or_shipped() -> None:
    for stage, files in STAGES.items():
        for path in files.inputs:
            made_by = producers(path)
            assert made_by or path in SHIPPED, (stage, path)
            assert all(STAGE_ORDER.index(p) < STAGE_ORDER.index(stage) for p in made_by), \
                (stage, path, made_by)
    assert producers(FEATURES) == ["extract_features"]
    assert producers(SCORES) == ["train_confidnet", "finetune", "baselines"]
    assert producers(PARAMS_CHECKED) == ["check_params"]


def test_check_params_comes_first_and_every_other_stage_depends_on_it() -> None:
    assert STAGE_ORDER[0] == "check_params" and not STAGES["check_params"].inputs
    assert all(PARAMS_CHECKED in STAGES[s].inputs for s in STAGE_ORDER[1:])


def test_missing_inputs_names_a_missing_folder_or_what_is_missing_inside(tmp_path: Path) -> None:
    assert missing_inputs("evaluate", tmp_path) == [FEATURES, SCORES]
    (tmp_path / FEATURES).mkdir()
    (tmp_path / SCORES).mkdir()
    (tmp_path / CONFIDNET_SCORES).write_bytes(b"")
    assert missing_inputs("evaluate", tmp_path) == [FINETUNED_SCORES, BASELINE_SCORES]
    (tmp_path / FINETUNED_SCORES).write_bytes(b"")
    (tmp_path / BASELINE_SCORES).mkdir()
    assert missing_inputs("evaluate", tmp_path) == []
    # run_stage validates params itself: check_params's output is not required
    assert not (tmp_path / PARAMS_CHECKED).exists()
    # the shipped package data is checked for too
    assert missing_inputs("download", tmp_path) == [artifacts.CAMVID_MANIFEST]
    assert missing_inputs("not_a_stage", tmp_path) == []


def test_missing_inputs_message_is_one_line_with_the_command(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert missing_inputs_message("evaluate") == (
        "features/ and scores/ are missing; make them with: "
        "dvc repro extract_features train_confidnet finetune baselines")
    (tmp_path / "features").mkdir()
    (tmp_path / "scores").mkdir()
    (tmp_path / "scores" / "baselines").mkdir()
    (tmp_path / "scores" / "confidnet.npz").write_bytes(b"")
    assert missing_inputs_message("evaluate") == (
        "scores/confidnet_finetuned.npz is missing; make it with: dvc repro finetune")
    (tmp_path / "scores" / "confidnet_finetuned.npz").write_bytes(b"")
    assert missing_inputs_message("evaluate") is None
    assert missing_inputs_message("report").startswith(  # type: ignore[union-attr]
        "pipeline/paper_results.yaml, pipeline/templates/report.md.j2, data/ and metrics/ "
        "are missing")
    assert missing_inputs_message("report").endswith(  # type: ignore[union-attr]
        "are missing; make them with: dvc repro download train_classifier "
        "train_confidnet finetune evaluate; restore "
        "pipeline/paper_results.yaml pipeline/templates/report.md.j2 with: git checkout -- "
        "pipeline/paper_results.yaml pipeline/templates/report.md.j2")


def fresh_clone(tmp_path: Path, **changes: object) -> Path:
    """What a fresh clone holds besides the code: params.yaml and conf/, no outputs."""
    project = tmp_path / "project"
    project.mkdir(parents=True)
    write_conf(project)
    write_params(project, {**fast_params(), **changes})
    return project


def python_module(project: Path, module: str, torch: bool = True,
                  ) -> subprocess.CompletedProcess[str]:
    """``python -m module`` in ``project``; without ``torch``, any import of torch fails."""
    command = [sys.executable, "-m", module] if torch else without_torch(module)
    return subprocess.run(command, cwd=project,
                          env=subprocess_env({"PYTHONPATH": str(REPO)}), capture_output=True,
                          text=True, timeout=300)


def test_stage_without_its_inputs_exits_2_with_one_line_and_no_run(tmp_path: Path) -> None:
    project = fresh_clone(tmp_path)
    proc = python_module(project, "stages.evaluate")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "error: features/ and scores/ are missing; make them with: "
        "dvc repro extract_features train_confidnet finetune baselines"], proc.stderr
    assert not (project / "mlflow.db").exists() and not (project / "mlruns").exists()
    assert sorted(p.name for p in project.iterdir()) == ["conf", "params.yaml"]


def test_check_params_stops_a_bad_value_and_says_how_to_get_back(tmp_path: Path) -> None:
    project = fresh_clone(tmp_path, loss="foo")
    proc = python_module(project, "stages.check_params")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(
        "error: invalid params.yaml:\n  loss = 'foo': valid values: bce, focal, mse, ranking\n"
        "  params.yaml now holds the value(s) above; no output was deleted. To get back, "
        "compose it again from conf/:\n  `python -m pipeline.settings` (with your overrides, "
        "if any; `git checkout conf/` first if you edited a preset),\n  or rerun with a valid "
        "value: `dvc exp run -S key=value`.\n"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in project.iterdir()) == ["conf", "params.yaml"]


def test_check_params_writes_the_same_bytes_for_any_valid_params(tmp_path: Path) -> None:
    written = []
    for changes in ({}, {"seed": 5, "loss": "focal"}):
        project = fresh_clone(tmp_path / str(len(written)), **changes)
        proc = python_module(project, "stages.check_params")
        assert proc.returncode == 0, proc.stderr
        assert sorted(p.name for p in project.iterdir()) == ["conf", "params.yaml", "runs"]
        written.append((project / PARAMS_CHECKED).read_bytes())
    assert written[0] == written[1] != b""


def test_dvc_yaml_keeps_check_params_output_when_it_fails() -> None:
    """``persist``: DVC does not delete the output before the stage runs, so a failed
    check deletes nothing at all."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["check_params"]
    assert spec["outs"] == [{PARAMS_CHECKED.as_posix(): {"persist": True}}]
    assert spec["params"] == [{"params.yaml": None}]


@pytest.mark.parametrize("stage", ["check_params", "download", "evaluate", "report"])
def test_stages_that_compute_without_torch_never_import_it(tmp_path: Path, stage: str) -> None:
    """Validating params.yaml (every registry name and the dataset's task included),
    checking the device and the inputs, seeding: none of it imports torch, whose import
    costs seconds of every stage. Run where importing torch fails: check_params passes,
    the others reach their missing inputs (they run to the end without torch in
    test_pipeline_e2e.py; download, of the digits)."""
    project = fresh_clone(tmp_path)
    proc = python_module(project, f"stages.{stage}", torch=False)
    assert "Traceback" not in proc.stderr, proc.stderr
    if stage == "check_params":
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error: ") and " missing; " in proc.stderr


def test_check_params_without_torch_reports_every_bad_name(tmp_path: Path) -> None:
    """The registries' names, the models' among them, are checked without torch."""
    classifier = {**fast_params()["classifier"], "model": "resnet"}
    project = fresh_clone(tmp_path, loss="foo", dataset="imagenet", criterion="mcp",
                          classifier=classifier)
    proc = python_module(project, "stages.check_params", torch=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(
        "error: invalid params.yaml:\n"
        "  dataset = 'imagenet': valid values: camvid, cifar10, cifar100, digits, mnist, svhn\n"
        "  loss = 'foo': valid values: bce, focal, mse, ranking\n"
        "  criterion = 'mcp': valid values: tcp, tcp_r\n"
        "  classifier.model = 'resnet': valid values: mlp, segnet, smallconv_mnist, "
        "smallconv_svhn, vgg16\n"
        "  params.yaml now holds the value(s) above"), proc.stderr


def test_the_torch_free_check_fails_for_a_stage_that_imports_torch(tmp_path: Path) -> None:
    proc = python_module(fresh_clone(tmp_path), "stages.train_classifier", torch=False)
    assert proc.returncode == 1
    assert "ImportError: import of torch blocked" in proc.stderr, proc.stderr


def test_check_params_stops_a_device_that_is_not_there(tmp_path: Path) -> None:
    """CUDA asked for where there is none: stopped by check_params, before any stage."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    proc = python_module(fresh_clone(tmp_path, device="cuda"), "stages.check_params")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(
        "error: device = 'cuda' but CUDA is not available; use auto or cpu\n"
        "  params.yaml now holds the value(s) above"), proc.stderr
