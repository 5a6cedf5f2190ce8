"""End to end: the real DVC pipeline, its experiments and its MLflow records, in a
temporary copy of the project with fast params (see conftest.py).

The tests share one project and run in file order: the full `dvc repro` happens once (the
session's :func:`conftest.baseline`, which other modules copy or clone), the experiments
start from its committed result, and the MLflow checks read what every earlier command
logged. Each DVC command is recorded in ``LEDGER`` (stages run, experiment name,
git HEAD, time window, metrics/evaluate.json afterwards) for the later tests to check.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import (
    ALL_STAGES,
    FAST_OVERRIDES,
    REPO,
    STAGES,
    UNTRACKED,
    Baseline,
    experiments_shown,
    fast_params,
    git_head,
    run,
    table_row,
    without_torch,
    write_params,
)

from pipeline.baselines import SCORERS
from pipeline.metrics import METRIC_NAMES
from pipeline.report import plural
from pipeline.tracking import flatten

BASELINE_METHODS = tuple(SCORERS.names())  # every registered scoring function
METHODS = (*BASELINE_METHODS, "confidnet", "confidnet_finetuned")
METRIC_KEYS = METRIC_NAMES
LOSS_RERUNS = {"check_params", "train_confidnet", "finetune", "evaluate", "report"}
EXPERIMENT = fast_params()["tracking"]["experiment"]  # "confidnet"

pytestmark = pytest.mark.slow

RUNNING = re.compile(r"Running stage '([^']+)'")
EXP_NAME = re.compile(r"Ran experiment\(s\): ([\w.-]+)")


@dataclass
class Command:
    label: str
    args: list[str]
    stages: list[str]
    exp_name: str | None
    head: str
    started: float
    finished: float
    evaluation: dict[str, Any] | None
    headline: dict[str, Any] | None
    tracked: bool = True


@dataclass
class Ledger:
    commands: list[Command] = field(default_factory=list)
    baseline: dict[str, Any] | None = None  # metrics/evaluate.json of the committed repro


LEDGER = Ledger()


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def output_of(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def dvc(project: Path, label: str, args: Sequence[str], *, check: bool = True,
        tracked: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a DVC command in the shared project (its stages untracked unless ``tracked``)
    and record what it did."""
    head = git_head(project)
    started = time.time()
    proc = run(project, args, check=check, env=None if tracked else UNTRACKED)
    finished = time.time()
    out = output_of(proc)
    names = EXP_NAME.findall(out)
    evaluation = project / "metrics" / "evaluate.json"
    headline = project / "metrics" / "headline.json"
    LEDGER.commands.append(Command(
        label=label, args=list(args), stages=RUNNING.findall(out),
        exp_name=names[-1] if names else None, head=head, started=started,
        finished=finished, evaluation=read_json(evaluation) if evaluation.exists() else None,
        headline=read_json(headline) if headline.exists() else None, tracked=tracked,
    ))
    assert git_head(project) == head, f"`{' '.join(args)}` moved HEAD"
    return proc


def require_baseline() -> dict[str, Any]:
    if LEDGER.baseline is None:
        pytest.fail("needs test_repro_runs_every_stage and test_second_repro_runs_nothing "
                    "to have passed first (run the module in file order)", pytrace=False)
    return LEDGER.baseline


def reset_to_baseline(project: Path) -> None:
    """Back to the committed repro: params, lock file and outputs (from the DVC cache)."""
    run(project, ["git", "checkout", "HEAD", "--", "params.yaml", "dvc.lock"])
    run(project, ["dvc", "checkout", "--force"])


def experiment(project: Path, *overrides: str,
               tracked: bool = True) -> tuple[Command, dict[str, Any]]:
    require_baseline()
    reset_to_baseline(project)
    args = ["dvc", "exp", "run"]
    for override in overrides:
        args += ["-S", override]
    dvc(project, " ".join(overrides), args, tracked=tracked)
    command = LEDGER.commands[-1]
    assert command.exp_name, f"no experiment name in the output of `{' '.join(args)}`"
    assert command.evaluation is not None
    return command, command.evaluation


def assert_complete_evaluation(project: Path) -> dict[str, Any]:
    """metrics/evaluate.json (test) and metrics/validation.json hold every metric of every
    method; the test ones are finite. Returns the test metrics."""
    test = read_json(project / "metrics" / "evaluate.json")
    val = read_json(project / "metrics" / "validation.json")
    for name, split in (("test", test), ("val", val)):
        assert set(split["methods"]) == set(METHODS), name
        for method in METHODS:
            assert set(METRIC_KEYS) <= set(split["methods"][method]), (name, method)
        assert 0 < split["errors"] < split["size"], name
    for method in METHODS:
        for key in METRIC_KEYS:
            value = test["methods"][method][key]
            assert isinstance(value, float) and math.isfinite(value), (method, key, value)
    return test


# --- the pipeline -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def project(baseline: Baseline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's copy of the session's reproduced project: its experiments change it,
    in file order (pytest-xdist's `--dist loadfile` keeps a module in one worker)."""
    return baseline.copy(tmp_path_factory.mktemp("e2e") / "project")


def test_repro_runs_every_stage(baseline: Baseline, project: Path) -> None:
    LEDGER.commands.append(Command(
        label="repro", args=["dvc", "repro"], stages=RUNNING.findall(baseline.output),
        exp_name=None, head=baseline.head, started=baseline.started,
        finished=baseline.finished,
        evaluation=read_json(project / "metrics" / "evaluate.json"),
        headline=read_json(project / "metrics" / "headline.json")))
    ran = LEDGER.commands[-1].stages
    assert sorted(ran) == sorted(ALL_STAGES), ran
    assert ran[0] == "check_params" and ran[-1] == "report", ran

    report = project / "reports" / "report.md"
    assert report.is_file() and report.stat().st_size > 0
    assert "confidnet" in report.read_text().lower()
    assert_complete_evaluation(project)
    assert_report_reads_on_its_own(project, report.read_text(), ran_in=baseline.path)


def assert_report_reads_on_its_own(project: Path, text: str, ran_in: Path) -> None:
    """The numbers a reader needs are there, filled in from the outputs."""
    evaluation = json.loads((project / "metrics" / "evaluate.json").read_text())
    confidnet = json.loads((project / "metrics" / "train_confidnet.json").read_text())
    prose = text.split("```yaml")[0]  # the params block after it may hold `checksums: {}`
    assert "{" not in prose, "unformatted placeholder in the report"
    errors = plural(evaluation["errors"], "error")
    assert f"**{errors} among {evaluation['size']} test samples**" in text
    assert f"**{plural(confidnet['train_errors'], 'classifier error')} among" in text
    mcp = evaluation["methods"]["mcp"]["aupr_error"]
    # the AUPR-Error column, with its interval (in bold if it is the column's best)
    assert f"{100 * mcp:.2f} [" in table_row(text, "MCP (baseline)")[1]
    for figure in ("risk_coverage.png", "confidence_histograms.png"):
        assert f"(figures/{figure})" in text
        assert (project / "reports" / "figures" / figure).stat().st_size > 0
    # Nothing that differs between runs of the same inputs: no commit, no path, no run id
    # (the runs are named by their MLflow experiment instead).
    assert git_head(project) not in text and git_head(project)[:10] not in text
    for where in (project, ran_in):  # this copy, and where the repro ran
        assert str(where) not in text and str(where.resolve()) not in text
    run_ids = [r.info.run_id for r in runs_in(f"sqlite:///{project / 'mlflow.db'}")]
    assert run_ids, "the stages logged no MLflow run"
    assert not [i for i in run_ids if i in text], "an MLflow run id in the report"
    assert f"MLflow: experiment `{EXPERIMENT}`" in text


def test_second_repro_runs_nothing(project: Path) -> None:
    assert LEDGER.commands and sorted(LEDGER.commands[0].stages) == sorted(ALL_STAGES), \
        "needs test_repro_runs_every_stage first"
    proc = dvc(project, "repro again", ["dvc", "repro"])
    assert "Running stage" not in output_of(proc)
    status = run(project, ["dvc", "status"])
    assert "up to date" in output_of(status), output_of(status)
    # conftest.baseline committed the reproduced state (the user's next step): the
    # experiments' baseline
    assert run(project, ["git", "status", "--porcelain"]).stdout == ""
    LEDGER.baseline = read_json(project / "metrics" / "evaluate.json")


# --- experiments ------------------------------------------------------------------------


@pytest.mark.parametrize("override", ["loss=focal", "criterion=tcp_r"])
def test_confidnet_param_reruns_confidnet_stages_only(project: Path, override: str) -> None:
    baseline = require_baseline()
    command, after = experiment(project, override)
    assert set(command.stages) == LOSS_RERUNS and len(command.stages) == len(LOSS_RERUNS), \
        command.stages
    assert assert_complete_evaluation(project) == after
    for method in ("confidnet", "confidnet_finetuned"):
        assert after["methods"][method] != baseline["methods"][method], \
            f"{override} left {method}'s test metrics unchanged"
    for method in BASELINE_METHODS:  # their stages did not run: same numbers
        assert after["methods"][method] == baseline["methods"][method], method


def test_seed_change_reruns_every_stage(project: Path) -> None:
    baseline = require_baseline()
    # untracked: the experiments above are tracked ones, and this one shows that an
    # untracked experiment adds no run (test_mlflow_has_one_parent_...)
    command, after = experiment(project, "seed=1", tracked=False)
    assert sorted(command.stages) == sorted(ALL_STAGES), command.stages
    assert after["methods"]["mcp"] != baseline["methods"]["mcp"]


# --- MLflow -----------------------------------------------------------------------------


@contextmanager
def tracking(uri: str) -> Iterator[Any]:
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield mlflow
    finally:
        mlflow.set_tracking_uri(previous)


def runs_in(uri: str) -> list[Any]:
    with tracking(uri) as mlflow:
        return mlflow.search_runs(experiment_names=[EXPERIMENT], search_all_experiments=False,
                                  output_format="list")


def stage_runs(runs: list[Any]) -> list[Any]:
    return [r for r in runs if "dvc_stage" in r.data.tags]


def parents(runs: list[Any]) -> list[Any]:
    return [r for r in runs if "dvc_stage" not in r.data.tags]


def test_mlflow_has_one_parent_per_execution_and_one_run_per_stage(project: Path) -> None:
    import mlflow

    require_baseline()
    commands = [c for c in LEDGER.commands if c.tracked]
    untracked = [c for c in LEDGER.commands if not c.tracked]
    assert len(commands) >= 4 and untracked, "needs the repro and experiment tests first"
    uri = f"sqlite:///{project / 'mlflow.db'}"
    runs = runs_in(uri)

    executed = Counter(stage for c in commands for stage in c.stages if stage in STAGES)
    logged = Counter(r.data.tags["dvc_stage"] for r in stage_runs(runs))
    assert logged == executed
    assert set(logged) == set(STAGES)
    assert len(parents(runs)) == sum(any(s in STAGES for s in c.stages) for c in commands)
    for command in untracked:  # CONFIDNET_TRACKING=off: its stages ran, and logged nothing
        assert command.stages, command.label
        assert not [r for r in runs
                    if command.started * 1000 <= r.info.start_time <= command.finished * 1000]

    client = mlflow.MlflowClient(tracking_uri=uri)
    epochs = FAST_OVERRIDES["classifier"]["epochs"]
    shown = experiments_shown(project)
    for command in commands:
        # a run belongs to the command during which it started
        mine = [r for r in runs
                if command.started * 1000 <= r.info.start_time <= command.finished * 1000]
        tracked = [s for s in command.stages if s in STAGES]  # check_params logs no run
        assert sorted(r.data.tags["dvc_stage"] for r in stage_runs(mine)) == \
            sorted(tracked), command.label
        if not tracked:
            assert not mine, command.label
            continue
        [parent] = parents(mine)
        assert parent.info.status == "FINISHED", command.label  # report ended it
        assert parent.data.tags["git_commit"] == command.head, command.label
        for r in stage_runs(mine):
            stage, tags = r.data.tags["dvc_stage"], r.data.tags
            assert tags["mlflow.parentRunId"] == parent.info.run_id, (command.label, stage)
            assert r.info.status == "FINISHED", (command.label, stage)
            assert tags.get("git_commit") == command.head, (command.label, stage)
            if command.args[:3] == ["dvc", "exp", "run"]:
                assert tags.get("dvc_exp_name"), (command.label, stage)
                assert tags["dvc_exp_name"] == command.exp_name, (command.label, stage)
            else:
                assert not tags.get("dvc_exp_name"), (command.label, stage)
            if stage == "train_classifier":
                history = client.get_metric_history(r.info.run_id, "val_accuracy")
                assert len(history) == epochs, (command.label, len(history))
            if stage == "evaluate":  # the headline, not hundreds of metrics
                assert command.headline is not None
                assert set(r.data.metrics) == {k for k, v in command.headline.items()
                                               if not isinstance(v, str)}, command.label
                artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
                assert {"test_metrics.json", "val_metrics.json", "test_intervals.json",
                        "test_paired_differences.json"} <= artifacts, artifacts

        # The headline on the parent, under the names DVC shows for it
        assert command.headline is not None
        numbers = {k: v for k, v in command.headline.items() if not isinstance(v, str)}
        words = {k: v for k, v in command.headline.items() if isinstance(v, str)}
        assert 0 < len(numbers) <= 25 and words, command.label
        assert parent.data.metrics == pytest.approx(numbers, rel=1e-12), command.label
        assert {k: parent.data.tags[k] for k in words} == words, command.label
        if command.exp_name:
            dvc_names = set(shown[command.exp_name]["metrics"]["metrics/headline.json"]["data"])
            assert dvc_names == set(parent.data.metrics) | set(words), command.label
            override = command.label  # e.g. "loss=focal"
            assert parent.info.run_name == f"{command.exp_name} ({override})", command.label
        else:
            assert parent.info.run_name == f"repro {command.head[:7]}", command.label
        assert {k for k, v in parent.data.params.items()} == set(flatten(fast_params()))


def test_exp_show_fits_160_columns_with_the_readme_command(project: Path) -> None:
    """The README's commands: each experiment's name, the params that differ and headline
    columns in a 160-column terminal, and only the headline among DVC's metrics."""
    require_baseline()
    shown = experiments_shown(project)
    for name, data in shown.items():
        assert list(data["metrics"]) == ["metrics/headline.json"], name
    readme = (REPO / "README.md").read_text()
    commands = [c for c in re.findall(r"^dvc exp show --only-changed .*$", readme, re.M)
                if "--keep" in c]  # the ones said to fit 160 columns
    assert len(commands) >= 3, commands
    hide = re.search(r"^hide='([^']+)'$", readme, re.M)
    assert hide is not None
    for command in commands:
        args = [a.replace("$hide", hide.group(1)) for a in shlex.split(command, comments=True)]
        out = run(project, [*args, "--no-pager"], env={"COLUMNS": "160"}).stdout
        print(f"$ COLUMNS=160 {command}\n{out}")
        lines = out.splitlines()
        assert max(len(line) for line in lines) <= 160, out
        assert "…" not in out, out  # no column collapsed for lack of room
        header = lines[1]
        for key in ("loss", "criterion", "seed", "test/"):
            assert key in header, (key, out)
        for name in shown:
            assert f"[{name}]" in out, (name, out)


def test_tracking_uri_override_logs_elsewhere(project: Path, tmp_path: Path) -> None:
    require_baseline()
    default_uri = f"sqlite:///{project / 'mlflow.db'}"
    other_uri = f"sqlite:///{tmp_path / 'other.db'}"
    before = {r.info.run_id for r in runs_in(default_uri)}

    run(project, ["python", "-m", "stages.evaluate"], env={"MLFLOW_TRACKING_URI": other_uri})

    assert {r.info.run_id for r in runs_in(default_uri)} == before
    other = runs_in(other_uri)
    assert [r.data.tags.get("dvc_stage") for r in stage_runs(other)] == ["evaluate"]
    [evaluate] = stage_runs(other)
    assert "test/confidnet/aupr_err" in evaluate.data.metrics
    assert evaluate.data.tags.get("git_commit") == git_head(project)
    [parent] = parents(other)
    assert evaluate.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert "test/confidnet/aupr_err" in parent.data.metrics


def test_stages_that_compute_without_torch_run_where_torch_cannot_be_imported(
        project: Path) -> None:
    """download (of the digits), evaluate and report compute with numpy alone: where any
    import of torch fails they still run to the end and write the same files."""
    require_baseline()
    reset_to_baseline(project)
    kept = ["data/split.json", "metrics/headline.json", "metrics/intervals.json",
            "reports/report.md"]
    before = {path: (project / path).read_bytes() for path in kept}
    # untracked: the project's store holds the runs the MLflow test counts
    for stage in ("download", "evaluate", "report"):
        run(project, without_torch(f"stages.{stage}"), env=UNTRACKED)
    assert {path: (project / path).read_bytes() for path in kept} == before


# --- bad params -------------------------------------------------------------------------


def stage_outputs(project: Path, stage: str) -> list[Path]:
    spec = yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage]
    paths = []
    for section in ("outs", "metrics", "plots"):
        for entry in spec.get(section, []):
            paths.append(project / (next(iter(entry)) if isinstance(entry, dict) else entry))
    return paths


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("loss", "nonsense", ["loss", "'nonsense'", "mse", "bce", "focal", "ranking"]),
        ("classifier.epochs", -3, ["classifier.epochs", "-3", ">= 1"]),
        ("dataset", "no_such_dataset", ["dataset", "'no_such_dataset'", "digits"]),
    ],
)
def test_bad_param_fails_before_any_output(fresh_project: Path, key: str, value: Any,
                                           expected: list[str]) -> None:
    params = fast_params()
    section, _, leaf = key.rpartition(".")
    (params[section] if section else params)[leaf] = value
    write_params(fresh_project, params)

    proc = run(fresh_project, ["dvc", "repro"], check=False)
    out = output_of(proc)
    assert proc.returncode != 0, out
    for text in expected:
        assert text in out, f"{text!r} missing from the output:\n{out}"

    ran = RUNNING.findall(out)
    assert ran, out
    failing = ran[-1]
    for path in stage_outputs(fresh_project, failing):
        assert not path.exists(), f"{failing} failed but wrote {path}"
    assert not (fresh_project / "dvc.lock").exists()
    assert not (fresh_project / "mlflow.db").exists(), "a run was tracked before validation"
