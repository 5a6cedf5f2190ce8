"""MLflow tracking: one parent run per pipeline execution with the stages nested under it,
logged by each stage's tracking process (live, and complete when the stage returns), and
records (``runs/<stage>.json``) without run ids. MLflow failures never cost a result: a
stage whose store is unreachable (a closed port) or locked (another connection holds
``BEGIN EXCLUSIVE``), or whose tracking process dies or falls silent, finishes with a
warning and complete outputs, and ``python -m pipeline.replay`` logs those outputs later,
into SQLite or a real ``mlflow server``, matching the DVC outputs and the runs the stages
log themselves."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from conftest import (
    MLFLOW_SERVER_ENV,
    REPO,
    STAGES,
    Reproduced,
    fast_params,
    free_port,
    git_head,
    run,
    subprocess_env,
    write_conf,
    write_params,
)

from pipeline import replay
from pipeline.stage import run_stage
from pipeline.tracking import (
    BACKOFF_MAX_SECONDS,
    CLIENT_DEFAULTS,
    MLFLOW_HTTP_DEFAULTS,
    TRACKING_SWITCH,
    StageRun,
    changed_params,
    client_defaults,
    experiment_id,
    flatten,
    longest_call_seconds,
    parent_name,
    record_key,
    stage_run,
    tracking_enabled,
)
from stages import download

EXPERIMENT = fast_params()["tracking"]["experiment"]
CURVES = {"train_classifier": "classifier_curves.csv", "train_confidnet": "confidnet_curves.csv",
          "finetune": "finetune_curves.csv"}


# --- helpers --------------------------------------------------------------------------------


def client_for(uri: str) -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def all_runs(uri: str) -> list[Any]:
    client = client_for(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"no experiment {EXPERIMENT!r} at {uri}"
    return client.search_runs([experiment.experiment_id], max_results=1000)


def runs_by_stage(uri: str) -> dict[str, list[Any]]:
    """The stage runs by stage (parent runs, which have no stage, left out)."""
    found: dict[str, list[Any]] = {}
    for r in all_runs(uri):
        if "dvc_stage" in r.data.tags:
            found.setdefault(r.data.tags["dvc_stage"], []).append(r)
    return found


def parent_runs(uri: str) -> list[Any]:
    return [r for r in all_runs(uri) if "dvc_stage" not in r.data.tags]


RECORD_KEYS = {"stage", "params", "metrics", "tags", "steps", "parent"}


def assert_record_has_no_ids(project: Path, stage: str) -> dict[str, Any]:
    """runs/<stage>.json holds what the stage logged and nothing that changes from run to
    run: no MLflow run or experiment id, no path, no commit, no time."""
    text = (project / "runs" / f"{stage}.json").read_text()
    record = json.loads(text)
    assert set(record) == RECORD_KEYS, (stage, sorted(record))
    assert str(project) not in text and "mlflow" not in text.lower(), (stage, text[:500])
    return record


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def expected_final_metrics(project: Path, stage: str) -> dict[str, float]:
    """Final metrics a stage's outputs hold, named as the stage logs them (independent of
    pipeline.replay, so that a naming slip there shows)."""
    metrics = project / "metrics"
    if stage == "download":
        return {f"{s}_size": n for s, n in read_json(project / "data/split.json")["sizes"].items()}
    if stage == "train_classifier":
        summary = read_json(metrics / "classifier.json")
        return {"best_epoch": summary["best_epoch"],
                "best_val_accuracy": summary["val_accuracy"],
                "best_train_accuracy": summary["train_accuracy"]}
    if stage in ("train_confidnet", "finetune"):
        summary = read_json(metrics / f"{stage}.json")
        out = {"best_epoch": summary["best_epoch"],
               "best_val_aupr_error": summary["val_aupr_error"]}
        if stage == "train_confidnet":
            out["train_errors"] = summary["train_errors"]
        return out
    if stage == "evaluate":  # the headline's numbers, as metrics/headline.json has them
        return {k: v for k, v in read_json(metrics / "headline.json").items()
                if not isinstance(v, str) and not math.isnan(v)}
    return {}


def check_replayed(uri: str, project: Path) -> dict[str, Any]:
    """One replayed, FINISHED run per stage holding the project's params, final metrics and
    per-epoch curves; returns them by stage."""
    client = client_for(uri)
    by_stage = runs_by_stage(uri)
    assert sorted(by_stage) == sorted(STAGES)
    params = {k: str(v) for k, v in flatten(yaml.safe_load((project / "params.yaml")
                                                           .read_text())).items()}
    replayed = {}
    for stage, runs in by_stage.items():
        assert len(runs) == 1, (stage, len(runs))
        r = replayed[stage] = runs[0]
        record = read_json(project / "runs" / f"{stage}.json")
        assert r.info.status == "FINISHED", stage
        assert r.data.tags["replayed"] == "true", stage
        assert r.data.tags["git_commit"] == run(project, ["git", "rev-parse", "HEAD"]
                                                ).stdout.strip(), stage
        assert r.data.tags.get("dvc_exp_name", "") == (record.get("dvc_exp_name") or ""), stage
        assert r.data.params == params, stage
        expected = expected_final_metrics(project, stage)
        for name, value in expected.items():
            assert r.data.metrics[name] == pytest.approx(value, rel=1e-12), (stage, name)
        # per-step metrics: exactly what the stage recorded, which the curves hold too
        recorded_steps: dict[str, list[tuple[int, float]]] = {}
        for step, name, value in record["steps"]:
            recorded_steps.setdefault(name, []).append((step, value))
        for name, want in recorded_steps.items():
            history = client.get_metric_history(r.info.run_id, name)
            assert sorted((m.step, m.value) for m in history) == sorted(want), (stage, name)
        if stage in CURVES:
            with (project / "plots" / CURVES[stage]).open(newline="") as handle:
                rows = list(csv.DictReader(handle))
            for column in rows[0]:
                if column == "epoch":
                    continue
                want = [(int(row["epoch"]), float(row[column])) for row in rows
                        if row[column] and int(row["epoch"]) > 0]  # epoch 0 is not logged
                got = sorted((step, float(f"{value:.6g}"))
                             for step, value in recorded_steps[column])
                assert got == want, (stage, column)
        else:
            assert set(r.data.metrics) >= set(expected), stage
    # the headline, on the evaluate run and on the parent, under its DVC names
    headline = read_json(project / "metrics" / "headline.json")
    [parent] = parent_runs(uri)
    assert parent.info.status == "FINISHED" and parent.data.tags["replayed"] == "true"
    assert parent.data.params == params
    for r in (replayed["evaluate"], parent):
        assert r.data.metrics == expected_final_metrics(project, "evaluate")
        assert r.data.tags["test/vs_mcp/verdict"] == headline[
            "test/vs_mcp/verdict"]
    for r in replayed.values():
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
    return replayed


# --- fast: one stage in this process ----------------------------------------------------------


@pytest.fixture
def small_project(tmp_path: Path, isolated_mlflow: pytest.MonkeyPatch) -> Path:
    """params.yaml and dvc.yaml in a temporary working directory (no git, no DVC)."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(fast_params()))
    (tmp_path / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    write_conf(tmp_path)
    # package data the data stages check for (their dvc.yaml deps)
    shutil.copytree(REPO / "pipeline" / "manifests", tmp_path / "pipeline" / "manifests")
    isolated_mlflow.chdir(tmp_path)
    return tmp_path


def test_mlflow_http_defaults_are_mlflows_own() -> None:
    """The copy of MLflow's client defaults that :func:`longest_call_seconds` falls back
    on, and urllib3's backoff cap, agree with the installed libraries."""
    import mlflow.environment_variables as variables
    from urllib3.util.retry import Retry

    assert {name: getattr(variables, name).default for name in MLFLOW_HTTP_DEFAULTS} == \
        MLFLOW_HTTP_DEFAULTS
    assert Retry.DEFAULT_BACKOFF_MAX == BACKOFF_MAX_SECONDS


def test_the_quiet_wait_grows_with_the_clients_patience(
        isolated_mlflow: pytest.MonkeyPatch) -> None:
    client_defaults()
    # two tries of 10 s, one backoff of 2 s plus at most 1 s of jitter
    assert longest_call_seconds(os.environ) == 23.0
    assert StageRun("download").quiet_seconds() == StageRun.QUIET_SECONDS
    isolated_mlflow.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    slow = StageRun("download").quiet_seconds()
    assert slow == pytest.approx(StageRun.QUIET_SECONDS * (2 * 120 + 3) / 23)
    isolated_mlflow.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")  # MLflow's default
    # 8 tries of 120 s; backoffs 2, 4, ..., 64, then capped at 120, each plus 1 of jitter
    assert longest_call_seconds(os.environ) == 8 * 120 + (3 + 5 + 9 + 17 + 33 + 65 + 120)
    assert StageRun("download").quiet_seconds() > slow
    isolated_mlflow.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # quicker than the defaults
    isolated_mlflow.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    assert StageRun("download").quiet_seconds() == StageRun.QUIET_SECONDS
    isolated_mlflow.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "ten")  # MLflow reports it
    assert StageRun("download").quiet_seconds() == StageRun.QUIET_SECONDS


def test_client_defaults_fail_fast_and_yield_to_the_user(
        isolated_mlflow: pytest.MonkeyPatch) -> None:
    isolated_mlflow.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    client_defaults()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == CLIENT_DEFAULTS[
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "120"  # the user's value stands
    from mlflow.environment_variables import (
        MLFLOW_HTTP_REQUEST_MAX_RETRIES,
        MLFLOW_HTTP_REQUEST_TIMEOUT,
    )

    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() == 1  # the names MLflow reads
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 120


def run_download_expecting_warning(project: Path, cause: str) -> float:
    started = time.monotonic()
    with pytest.warns(RuntimeWarning, match=rf"(?s)MLflow start failed.*{cause}.*stage "
                      r"'download' goes on without tracking.*`python -m pipeline\.replay "
                      r"--stage download`"):
        run_stage("download", download.body)
    elapsed = time.monotonic() - started
    assert (project / "data" / "dataset.npz").is_file()
    assert (project / "data" / "split.json").is_file()
    record = assert_record_has_no_ids(project, "download")
    assert record["stage"] == "download"
    return elapsed


def replay_download(project: Path, uri: str, capsys: pytest.CaptureFixture[str]) -> Any:
    os.environ["MLFLOW_TRACKING_URI"] = uri  # isolated_mlflow restores it
    assert replay.main(["--stage", "download"]) == 0
    assert "download: logged run" in capsys.readouterr().out
    [r] = runs_by_stage(uri)["download"]
    assert r.info.status == "FINISHED"
    assert r.data.tags["replayed"] == "true"
    assert r.data.params == {k: str(v) for k, v in flatten(fast_params()).items()}
    sizes = read_json(project / "data" / "split.json")["sizes"]
    assert r.data.metrics == {f"{s}_size": n for s, n in sizes.items()}
    [parent] = parent_runs(uri)  # made by the replay, which ended it
    assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.status == "FINISHED"
    # again with --only-missing: recognised, nothing new
    assert replay.main(["--only-missing"]) == 0
    assert f"download: skipped: the store holds its record as run {r.info.run_id}" in \
        capsys.readouterr().out
    assert len(runs_by_stage(uri)["download"]) == 1 and len(parent_runs(uri)) == 1
    return r


def test_unreachable_server_stage_finishes_fast_then_replays(
        small_project: Path, isolated_mlflow: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    isolated_mlflow.setenv("MLFLOW_TRACKING_URI", closed)
    elapsed = run_download_expecting_warning(small_project, "Connection refused")
    assert elapsed < 30, f"{elapsed:.0f} s against a closed port"
    # replay while the server is still down: one clear error, quickly
    started = time.monotonic()
    assert replay.main(["--stage", "download"]) == 1
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err
    assert f"error: MLflow at {closed} failed" in err and "--only-missing" in err, err
    replay_download(small_project, f"sqlite:///{small_project / 'later.db'}", capsys)


@pytest.mark.parametrize("store", ["fresh", "in use"])
def test_locked_sqlite_store_stage_finishes_then_replays(
        small_project: Path, isolated_mlflow: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], store: str) -> None:
    db = small_project / "mlflow.db"
    if store == "in use":  # a store another process created and is writing to
        subprocess.run([sys.executable, "-c", "import mlflow, sys; "
                        "mlflow.MlflowClient(sys.argv[1]).search_experiments()",
                        f"sqlite:///{db}"], env=subprocess_env(), check=True,
                       capture_output=True, timeout=120)
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        # the default store, mlflow.db
        elapsed = run_download_expecting_warning(small_project, "database is locked")
    finally:
        holder.rollback()
        holder.close()
    assert elapsed < 60, f"{elapsed:.0f} s against a locked store"
    replay_download(small_project, f"sqlite:///{db}", capsys)


def test_replay_refuses_what_it_cannot_do(small_project: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{small_project / 'never.db'}"
    assert replay.main(["--stage", "nonsense"]) == 2
    assert "unknown stage 'nonsense'" in capsys.readouterr().err
    assert replay.main(["--stage", "evaluate"]) == 2
    err = capsys.readouterr().err
    assert "stage 'evaluate' has no outputs to replay" in err and "dvc pull" in err
    assert replay.main([]) == 0
    assert "nothing to replay" in capsys.readouterr().err
    assert not (small_project / "never.db").exists()


def test_replay_skips_outputs_of_other_params(small_project: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    (small_project / "runs").mkdir()
    (small_project / "runs" / "download.json").write_text("{}")
    (small_project / "data").mkdir()
    lock = {"schema": "2.0", "stages": {"download": {"params": {"params.yaml": {
        "seed": 7, "dataset": "digits", "data": {
            "test_fraction": "3e-1", "val_fraction": 0.1, "split_seed": None, "mirror": "",
            "checksums": {}, "image_scale": 1.0, "max_images_per_split": 0}}}}}}
    (small_project / "dvc.lock").write_text(yaml.safe_dump(lock))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{small_project / 'other.db'}"
    assert replay.main(["--stage", "download"]) == 1
    err = capsys.readouterr().err
    assert "download: skipped: its outputs come from other params than params.yaml (seed," in err
    assert "data" not in err.split("(seed,")[1].split(")")[0]  # "3e-1" is DVC's 0.3


def test_replay_skips_unreadable_outputs(small_project: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    (small_project / "runs").mkdir()
    (small_project / "runs" / "download.json").write_text('{"params": {"se')
    (small_project / "data").mkdir()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{small_project / 'other.db'}"
    assert replay.main([]) == 1
    err = capsys.readouterr().err
    assert "download: skipped: its record runs/download.json cannot be read " \
        "(JSONDecodeError" in err, err
    assert "`dvc checkout download`" in err
    assert not (small_project / "other.db").exists()  # nothing to log: store untouched


# --- fast: the parent run of a pipeline execution ------------------------------------------


@pytest.fixture
def git_project(small_project: Path) -> Path:
    """small_project committed in git: its params.yaml is the baseline of experiments."""
    for command in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.com"],
                    ["git", "config", "user.name", "t"],
                    ["git", "config", "commit.gpgsign", "false"], ["git", "add", "-A"],
                    ["git", "commit", "-qm", "baseline"]):
        run(small_project, command)
    return small_project


def nothing(params: dict[str, Any], stage_run: Any) -> None:
    """A stage body that does nothing (the tracking around it is what is tested)."""


def stand_in_inputs(project: Path, stage: str) -> None:
    """Empty stand-ins for the inputs ``stage`` checks before it starts (its body here,
    :func:`nothing`, reads none of them)."""
    from pipeline.artifacts import missing_inputs

    while missing := missing_inputs(stage, project):  # a folder, then the files in it
        for path in missing:
            target = project / path
            if path.suffix:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.touch()
            else:
                target.mkdir(parents=True)


def test_stages_nest_under_one_parent_named_after_the_changes(
        git_project: Path, isolated_mlflow: pytest.MonkeyPatch) -> None:
    params = fast_params()
    params["seed"], params["loss"] = 1, "focal"
    write_params(git_project, params)  # what `dvc exp run -S seed=1 -S loss=focal` does
    isolated_mlflow.setenv("DVC_EXP_NAME", "prime-sick")
    uri = f"sqlite:///{git_project / 'mlflow.db'}"

    run_stage("download", download.body)
    [parent] = parent_runs(uri)
    assert parent.info.run_name == "prime-sick (seed=1, loss=focal)"
    assert parent.info.status == "RUNNING"  # until the last stage ends it
    assert parent.data.params == {k: str(v) for k, v in flatten(params).items()}
    assert parent.data.tags["dvc_exp_name"] == "prime-sick"
    assert parent.data.tags["git_commit"] == git_head(git_project)
    stand_in_inputs(git_project, "report")
    run_stage("report", nothing)

    [parent] = parent_runs(uri)
    assert parent.info.status == "FINISHED" and parent.info.end_time
    stages = runs_by_stage(uri)
    assert sorted(stages) == ["download", "report"]
    for [child] in stages.values():
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.run_name == f"prime-sick:{child.data.tags['dvc_stage']}"
        record = assert_record_has_no_ids(git_project, child.data.tags["dvc_stage"])
        assert child.data.tags["replay_key"] == record_key(record)
    experiment = client_for(uri).get_experiment_by_name(EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # another execution (another experiment) gets a parent of its own
    isolated_mlflow.setenv("DVC_EXP_NAME", "other-exp")
    run_stage("download", download.body)
    assert sorted(r.info.run_name for r in parent_runs(uri)) == [
        "other-exp (seed=1, loss=focal)", "prime-sick (seed=1, loss=focal)"]


def test_a_failed_stage_fails_the_parent_and_a_rerun_continues_it(
        git_project: Path, isolated_mlflow: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{git_project / 'mlflow.db'}"

    def broken(params: dict[str, Any], stage_run: Any) -> None:
        raise RuntimeError("boom")

    stand_in_inputs(git_project, "train_classifier")
    with pytest.raises(RuntimeError, match="boom"):
        run_stage("train_classifier", broken)
    shutil.rmtree(git_project / "data")  # the stand-in, before download makes the real one
    [parent] = parent_runs(uri)  # `dvc repro`: keyed on the commit and params.yaml
    assert parent.info.run_name == f"repro {git_head(git_project)[:7]}"
    assert parent.info.status == "FAILED"
    run_stage("download", download.body)  # `dvc repro` again, same commit and params
    [again] = parent_runs(uri)
    assert again.info.run_id == parent.info.run_id and again.info.status == "RUNNING"
    assert {r.data.tags["mlflow.parentRunId"] for rs in runs_by_stage(uri).values()
            for r in rs} == {parent.info.run_id}


def test_records_are_the_same_bytes_whatever_the_run(
        git_project: Path, isolated_mlflow: pytest.MonkeyPatch) -> None:
    uri = f"sqlite:///{git_project / 'mlflow.db'}"
    texts = []
    for name in ("first-exp", "second-exp"):
        isolated_mlflow.setenv("DVC_EXP_NAME", name)
        run_stage("download", download.body)
        texts.append((git_project / "runs" / "download.json").read_bytes())
    assert texts[0] == texts[1]
    runs = runs_by_stage(uri)["download"]
    assert len({r.info.run_id for r in runs}) == 2
    assert {r.data.tags["replay_key"] for r in runs} == {record_key(json.loads(texts[0]))}


# --- fast: the tracking process ---------------------------------------------------------------

# A stage's tracking, run as a stage runs: its own process, here in a working directory
# with params.yaml. Step 1 is sent at once and must reach the store while the stage still
# runs (live progress); steps 2 and 3 wait for end()'s flush.
LIVE_STAGE = """
import json, sqlite3, sys, time
from pathlib import Path
import numpy as np, yaml
from pipeline.tracking import stage_run

with stage_run("evaluate", yaml.safe_load(Path("params.yaml").read_text())) as run:
    run.FLUSH_SECONDS = 0.0
    run.log_metrics({"loss": 0.5}, step=1)
    deadline = time.monotonic() + 600  # a bound, not a timing: it is there or not
    while True:
        try:
            store = sqlite3.connect("file:mlflow.db?mode=ro", uri=True)
            seen = store.execute("select value from metrics where key = 'loss'").fetchall()
            store.close()
        except sqlite3.OperationalError:  # no store or no table yet
            seen = []
        if seen:
            break
        assert time.monotonic() < deadline, "step 1 never reached the store"
        time.sleep(0.2)
    run.FLUSH_SECONDS = 1e9
    run.log_metrics({"loss": 0.25}, step=2)
    run.log_metrics({"loss": 0.125, "gap": float("nan")}, step=3)
    run.log_metrics({"best_loss": np.float32(0.125)})
    run.log_headline({"test/x": 1.5}, {"test/verdict": "better"})
    Path("note.txt").write_text("hello")
    run.log_artifact("note.txt")
    run.log_table({"method": ["a", "b"], "value": [np.float64(1.0), None]}, "table.json")
print(json.dumps({"mlflow_imported": "mlflow" in sys.modules, "record": run.record(),
                  "source": sys.argv[0]}))
"""


def test_the_stage_logs_through_its_tracking_process(small_project: Path) -> None:
    """The stage never imports MLflow; its tracking process logs per-step metrics while
    the stage runs, and everything else by the time the stage exits."""
    out = run(small_project, [sys.executable, "-c", LIVE_STAGE],
              env={"PYTHONPATH": str(REPO)}).stdout
    result = json.loads(out.splitlines()[-1])
    assert result["mlflow_imported"] is False
    uri = f"sqlite:///{small_project / 'mlflow.db'}"
    client = client_for(uri)
    [stage] = runs_by_stage(uri)["evaluate"]
    assert stage.info.status == "FINISHED"
    history = client.get_metric_history(stage.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.25), (3, 0.125)]
    assert stage.data.metrics == {"loss": 0.125, "best_loss": 0.125, "test/x": 1.5}
    assert stage.data.tags["test/verdict"] == "better"
    assert stage.data.tags["replay_key"] == record_key(result["record"])
    assert stage.data.tags["mlflow.source.name"] == result["source"]  # the stage's, not ours
    assert {a.path for a in client.list_artifacts(stage.info.run_id)} == {
        "note.txt", "table.json"}
    table = json.loads(Path(client.download_artifacts(stage.info.run_id, "table.json",
                                                      str(small_project))).read_text())
    assert table["data"] == [["a", 1.0], ["b", None]]
    [parent] = parent_runs(uri)
    assert parent.info.status == "RUNNING"  # evaluate is not the last stage
    assert parent.data.metrics == {"test/x": 1.5}
    assert parent.data.tags["test/verdict"] == "better"
    assert stage.data.tags["mlflow.parentRunId"] == parent.info.run_id


# A stage's first import under DVC, then its run: the tracking process the stage ends up
# with is the one that import started (or none started, outside DVC).
EARLY_STAGE = """
import json, sys
from pathlib import Path
import yaml
import pipeline.early_tracking
from pipeline import tracking

early = tracking._early_companion
early_pid = early.process.pid if early is not None else None
if sys.argv[1] == "stop":  # stopped before its run, as by bad params
    print(json.dumps({"early_pid": early_pid}), flush=True)
    raise SystemExit(2)
with tracking.stage_run("evaluate", yaml.safe_load(Path("params.yaml").read_text())) as run:
    taken = run._companion.process.pid if run._companion is not None else None
    run.log_metrics({"x": 1.0})
print(json.dumps({"early_pid": early_pid, "taken_pid": taken, "record": run.record()}))
"""


def run_early_stage(project: Path, env: dict[str, str], then: str = "run") -> dict[str, Any]:
    proc = run(project, [sys.executable, "-c", EARLY_STAGE, then], check=then == "run",
               env={"PYTHONPATH": str(REPO), **env})
    return json.loads(proc.stdout.splitlines()[-1])


def test_under_dvc_the_stage_takes_the_tracking_process_its_first_import_started(
        small_project: Path) -> None:
    result = run_early_stage(small_project, {"DVC_STAGE": "evaluate"})
    assert result["early_pid"] is not None
    assert result["taken_pid"] == result["early_pid"]
    [stage] = runs_by_stage(f"sqlite:///{small_project / 'mlflow.db'}")["evaluate"]
    assert (stage.info.status, stage.data.metrics) == ("FINISHED", {"x": 1.0})


@pytest.mark.parametrize("env", [{}, {"DVC_STAGE": "check_params"},
                                 {"DVC_STAGE": "evaluate", "RANK": "1"}],
                         ids=["outside DVC", "untracked stage", "torchrun rank 1"])
def test_no_early_tracking_process_where_nothing_tracks_it(small_project: Path,
                                                          env: dict[str, str]) -> None:
    """Outside DVC the stage starts its tracking process itself, as it always did."""
    result = run_early_stage(small_project, env)
    assert result["early_pid"] is None
    assert result["taken_pid"] is not None


def test_with_tracking_off_a_stage_starts_no_process_and_still_records(
        small_project: Path) -> None:
    """CONFIDNET_TRACKING=off: no tracking process (neither early nor at the run), no
    store, no warning; the record that `pipeline.replay` logs later is the same."""
    proc = run(small_project, [sys.executable, "-W", "error::RuntimeWarning", "-c",
                               EARLY_STAGE, "run"],
               env={"PYTHONPATH": str(REPO), "DVC_STAGE": "evaluate",
                    "CONFIDNET_TRACKING": "Off"})
    result = json.loads(proc.stdout.splitlines()[-1])
    assert (result["early_pid"], result["taken_pid"]) == (None, None)
    assert result["record"]["metrics"] == {"x": 1.0}
    assert not (small_project / "mlflow.db").exists()
    tracked = run_early_stage(small_project, {"DVC_STAGE": "evaluate"})
    assert tracked["record"] == result["record"]


@pytest.mark.parametrize(("value", "enabled"),
                         [(None, True), ("", True), ("on", True), (" ON ", True),
                          ("off", False), ("OFF", False)])
def test_tracking_switch_values(value: str | None, enabled: bool) -> None:
    environ = {} if value is None else {TRACKING_SWITCH: value}
    assert tracking_enabled(environ) is enabled


def test_a_bad_tracking_switch_stops_the_stage_before_any_work(small_project: Path) -> None:
    proc = run(small_project, [sys.executable, "-m", "stages.evaluate"], check=False,
               env={"PYTHONPATH": str(REPO), "DVC_STAGE": "evaluate",
                    "CONFIDNET_TRACKING": "0"})
    assert proc.returncode == 2, proc.stderr
    assert "CONFIDNET_TRACKING='0' is not a valid value; use one of: on, off" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (small_project / "mlflow.db").exists()
    assert not (small_project / "runs").exists()


def test_an_unused_early_tracking_process_exits_with_its_stage(small_project: Path) -> None:
    """A stage that stops before its run (bad params, missing inputs) leaves no process
    behind and nothing in the store."""
    result = run_early_stage(small_project, {"DVC_STAGE": "evaluate"}, then="stop")
    pid = result["early_pid"]
    assert pid is not None
    deadline = time.monotonic() + 600  # a bound, not a timing: it exits or it does not
    while Path(f"/proc/{pid}").exists() and "zombie" not in process_state(pid):
        assert time.monotonic() < deadline, "the unused tracking process never exited"
        time.sleep(0.1)
    assert not (small_project / "mlflow.db").exists()


def process_state(pid: int) -> str:
    """``zombie`` once the process has exited but not been reaped (its parent, the stage,
    is gone, so init reaps it), else what ``/proc`` says, or ``gone``."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return "gone"
    return "zombie" if "\nState:\tZ" in status else status


def test_a_tracking_process_that_dies_costs_the_stage_nothing(small_project: Path) -> None:
    died = (r"MLflow end_run failed \(ChildProcessError: the tracking process exited with "
            r"status -9 before the run ended\); stage 'download' goes on without tracking")
    with pytest.warns(RuntimeWarning, match=died) as caught, \
            stage_run("download", fast_params()) as stage:
        stage.log_metrics({"before": 1.0})
        companion = stage._companion
        assert companion is not None
        companion.process.kill()
        stage.log_metrics({"after": 2.0}, step=1)
    assert len([w for w in caught if "MLflow" in str(w.message)]) == 1
    assert stage.record()["metrics"] == {"before": 1.0}
    assert stage.record()["steps"] == [[1, "after", 2.0]]


def test_a_stage_that_dies_leaves_its_run_killed(small_project: Path) -> None:
    """The stage's end of the pipe closes without an end (what its death does): the
    tracking process ends the run KILLED, and the parent run with it."""
    stage = StageRun("download")
    stage.start(EXPERIMENT, fast_params())
    companion = stage._companion
    assert companion is not None
    assert companion.close(StageRun.QUIET_SECONDS) == (
        "end_run", "ChildProcessError: the tracking process exited with status 0 before "
        "the run ended")
    uri = f"sqlite:///{small_project / 'mlflow.db'}"
    [run_] = runs_by_stage(uri)["download"]
    [parent] = parent_runs(uri)
    assert (run_.info.status, parent.info.status) == ("KILLED", "KILLED")


def test_a_silent_tracking_process_is_stopped(small_project: Path,
                                             isolated_mlflow: pytest.MonkeyPatch) -> None:
    """A server that takes the connection and never answers: the stage ends once its
    tracking process has said nothing for :meth:`StageRun.quiet_seconds` (QUIET_SECONDS
    under the client defaults, here 3 s, before the client's own 10 s timeout), and stops
    it."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        isolated_mlflow.setenv("MLFLOW_TRACKING_URI",
                               f"http://127.0.0.1:{server.getsockname()[1]}")
        isolated_mlflow.setattr(StageRun, "QUIET_SECONDS", 3.0)
        silent = (r"MLflow end_run failed \(TimeoutError: the tracking process said "
                  r"nothing for 3 s; stopped it\)")
        server.settimeout(600)
        with pytest.warns(RuntimeWarning, match=silent), \
                stage_run("download", fast_params()) as stage:
            stage.log_metrics({"size": 3.0})
            waiting, _ = server.accept()  # the tracking process asks, and gets no answer
        waiting.close()
    assert stage.record()["metrics"] == {"size": 3.0}


def test_parent_name_lists_the_changed_params() -> None:
    baseline = {"seed": 0, "loss": "mse", "classifier": {"lr": 0.01, "milestones": []}}
    changed = {"seed": 0, "loss": "focal", "classifier": {"lr": 1e-6, "milestones": [5]}}
    changes = changed_params(changed, baseline)
    assert changes == [("loss", "focal"), ("classifier.lr", 1e-6),
                       ("classifier.milestones", [5])]
    context = {"dvc_exp_name": "prime-sick", "git_commit": "0123456789"}
    assert parent_name(context, changes[:1]) == "prime-sick (loss=focal)"
    assert parent_name(context, [*changes, ("seed", 1)]) == (
        "prime-sick (loss=focal, classifier.lr=1e-06, classifier.milestones=[5], +1 more)")
    assert parent_name({"git_commit": "0123456789"}, []) == "repro 0123456"
    assert changed_params(changed, None) == []  # no baseline: outside git


def test_stale_params_reads_numbers_as_dvc_writes_them() -> None:
    from pipeline.config import read_yaml

    # dvc.lock writes `lr: 1e-06`, which YAML 1.1 would read as a string
    locked = read_yaml("finetune:\n  lr: 1e-06\n  epochs: 2\nseed: 0\n")
    stage = replay.Stage("s", [], locked)
    assert replay.stale_params(stage, {"finetune": {"lr": 1e-06, "epochs": 2}, "seed": 0}) == []
    assert replay.stale_params(stage, {"finetune": {"lr": 1e-05, "epochs": 2}, "seed": 0}) == [
        "finetune"]
    assert replay.stale_params(stage, {"finetune": {"lr": 1e-06, "epochs": 2}}) == ["seed"]


# --- slow: the whole pipeline, SQLite and a real server ----------------------------------------


@pytest.mark.slow
def test_pipeline_with_unreachable_server_completes(twin_projects: dict[str, Reproduced]) -> None:
    offline = twin_projects["offline"]
    warnings = offline.output.count("RuntimeWarning: MLflow start failed")
    assert warnings == len(STAGES), offline.output
    assert "python -m pipeline.replay --stage evaluate" in offline.output
    # one connection refused per stage, not MLflow's default four minutes of retries
    assert offline.seconds < twin_projects["tracked"].seconds + 120, (
        offline.seconds, twin_projects["tracked"].seconds)
    spec = yaml.safe_load((offline.path / "dvc.yaml").read_text())["stages"]
    for stage, body in spec.items():
        for section in ("outs", "metrics", "plots"):
            for entry in body.get(section, []):
                path = offline.path / (next(iter(entry)) if isinstance(entry, dict) else entry)
                assert path.exists(), (stage, path)
    for stage in STAGES:
        assert_record_has_no_ids(offline.path, stage)
    assert not (offline.path / "mlflow.db").exists()
    status = run(offline.path, ["dvc", "status"])
    assert "up to date" in status.stdout + status.stderr


@pytest.mark.slow
def test_replay_into_sqlite_matches_outputs_and_original_runs(
        twin_projects: dict[str, Reproduced], tmp_path: Path) -> None:
    offline, tracked = twin_projects["offline"].path, twin_projects["tracked"].path
    uri = f"sqlite:///{tmp_path / 'replayed.db'}"
    out = run(offline, ["python", "-m", "pipeline.replay"],
              env={"MLFLOW_TRACKING_URI": uri}).stdout
    assert out.count(": logged run ") == len(STAGES), out
    replayed = check_replayed(uri, offline)

    # The same names as the runs the stages log themselves (the tracked twin; same seed,
    # same numbers): per-epoch values carry the CSV's 6 digits, epoch 0 comes on top.
    original = runs_by_stage(f"sqlite:///{tracked / 'mlflow.db'}")
    for stage in STAGES:
        [mine] = original[stage]
        theirs = replayed[stage]
        assert set(theirs.data.metrics) == set(mine.data.metrics), stage
        assert theirs.data.params == mine.data.params, stage
        assert theirs.info.run_name == mine.info.run_name, stage
        finals = expected_final_metrics(offline, stage)
        for name, value in mine.data.metrics.items():
            tolerance = 1e-12 if name in finals else 1e-5
            assert theirs.data.metrics[name] == pytest.approx(value, rel=tolerance, abs=1e-9), \
                (stage, name)

    # replay is idempotent with --only-missing
    again = run(offline, ["python", "-m", "pipeline.replay", "--only-missing"],
                env={"MLFLOW_TRACKING_URI": uri}).stdout
    assert again.count("skipped: the store holds its record") == len(STAGES), again
    assert all(len(v) == 1 for v in runs_by_stage(uri).values())
    assert len(parent_runs(uri)) == 1


@pytest.mark.slow
def test_only_missing_skips_runs_the_store_holds(twin_projects: dict[str, Reproduced]) -> None:
    tracked = twin_projects["tracked"].path
    db = tracked / "mlflow.db"
    before = db.read_bytes()
    out = run(tracked, ["python", "-m", "pipeline.replay", "--only-missing"]).stdout
    # found by their replay_key: the records hold no run id
    assert out.count("skipped: the store holds its record as run ") == len(STAGES), out
    assert db.read_bytes() == before


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real `mlflow server` on a free local port, stopped at the end."""
    port = free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}"],
        cwd=tmp_path, env=subprocess_env(MLFLOW_SERVER_ENV), stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited {proc.returncode}:\n"
                            f"{(tmp_path / 'server.log').read_text()}", pytrace=False)
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mlflow server did not answer /health within 120 s", pytrace=False)
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
def test_replay_into_mlflow_server(twin_projects: dict[str, Reproduced], mlflow_server: str,
                                   isolated_mlflow: pytest.MonkeyPatch) -> None:
    offline = twin_projects["offline"].path
    out = run(offline, ["python", "-m", "pipeline.replay"],
              env={"MLFLOW_TRACKING_URI": mlflow_server}).stdout
    assert out.count(": logged run ") == len(STAGES), out
    replayed = check_replayed(mlflow_server, offline)
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)  # isolated_mlflow restores it
    frame = mlflow.search_runs(experiment_names=[EXPERIMENT],  # what the compare view reads
                               filter_string="tags.dvc_stage = 'evaluate'")
    assert list(frame["run_id"]) == [replayed["evaluate"].info.run_id]
    evaluation = read_json(offline / "metrics" / "evaluate.json")
    value = evaluation["methods"]["confidnet_finetuned"]["aupr_error"]
    assert np.isclose(frame["metrics.test/confidnet/aupr_err"].iloc[0], value, rtol=0)
    again = run(offline, ["python", "-m", "pipeline.replay", "--only-missing"],
                env={"MLFLOW_TRACKING_URI": mlflow_server}).stdout
    assert again.count("skipped: the store holds its record") == len(STAGES), again


def test_an_experiment_created_meanwhile_is_taken_not_an_error(
        tmp_path: Path, isolated_mlflow: pytest.MonkeyPatch) -> None:
    """Two queued experiments' first stages against one server both find the MLflow
    experiment missing; the creation that loses the race takes the winner's experiment
    (seen on a PostgreSQL-backed server: an IntegrityError, and a stage untracked). The
    interleaving is replayed on a real store: another client creates the experiment right
    after this one looked it up."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    other = client_for(uri)

    class LosesTheRace:
        def __getattr__(self, name: str) -> Any:
            return getattr(mlflow, name)

        def get_experiment_by_name(self, name: str) -> Any:
            found = mlflow.get_experiment_by_name(name)
            if found is None and not other.get_experiment_by_name(name):
                other.create_experiment(name)  # the other stage wins, between look-up and create
            return found

    isolated_mlflow.setenv("MLFLOW_TRACKING_URI", uri)
    created = experiment_id(LosesTheRace(), "raced", "http://server.invalid")
    assert created == other.get_experiment_by_name("raced").experiment_id
