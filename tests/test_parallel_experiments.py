"""Two queued experiments run at once (`dvc queue start -j 2`) in a copy of the session's
reproduced project (conftest.baseline) whose mlflow.db does not exist yet, so the first
stages of both open it at the same moment (the SQLite first-use race: two processes
creating one store at once). Both succeed, and MLflow holds one parent run per
experiment with its stages nested under it, in the project's store (reached through DVC_ROOT
from the queue's temporary copies), with its artifacts beside it."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
from conftest import QUEUED_OVERRIDES, Baseline, experiments_shown, run, run_queue

pytestmark = pytest.mark.slow

MUST_RUN = ("train_confidnet", "finetune", "evaluate", "report")  # what each override reruns
TIMEOUT_S = 2400  # a stall guard: other pytest-xdist workers share the cores with this queue
# Two, both at once: that is the race. A third would wait for a free worker, which
# test_tracking_server's and test_settings_e2e's queues do.
OVERRIDES = QUEUED_OVERRIDES[:2]


def test_two_queued_experiments_at_once(baseline: Baseline, tmp_path: Path) -> None:
    import mlflow

    # Reproduced and committed, so each experiment reruns the stages its override reads
    # (MUST_RUN and check_params), the first of them tracked; no MLflow store yet.
    project = baseline.copy(tmp_path / "project")
    (project / "mlflow.db").unlink()
    shutil.rmtree(project / "mlruns", ignore_errors=True)
    names: dict[str, str] = {}
    for override in OVERRIDES:
        out = run(project, ["dvc", "exp", "run", "--queue", "-S", override]).stdout
        match = re.search(r"Queued experiment '([\w.-]+)'", out)
        assert match, out
        names[match[1]] = override
    assert not (project / "mlflow.db").exists()

    started = time.monotonic()
    statuses = run_queue(project, set(names), 2, TIMEOUT_S)
    elapsed = time.monotonic() - started
    failed = {n: s for n, s in statuses.items() if s != "Success"}
    logs = {n: run(project, ["dvc", "queue", "logs", n], check=False).stdout for n in names}
    assert not failed, f"{failed}\n" + "\n".join(f"--- {n}\n{logs[n][-3000:]}" for n in failed)
    for name, log in logs.items():  # no stage lost its tracking (the first-use race)
        assert "MLflow start failed" not in log and "duplicate column" not in log, (name, log)

    shown = experiments_shown(project)
    assert set(names) <= set(shown), (names, list(shown))
    uri = f"sqlite:///{project / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("confidnet")
    # artifacts beside the store, not in a queue's throwaway copy under .dvc/tmp
    assert experiment.artifact_location.startswith((project / "mlruns").as_uri()), \
        experiment.artifact_location
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    assert all(r.info.status == "FINISHED" for r in runs), \
        [(r.data.tags.get("dvc_exp_name"), r.data.tags.get("dvc_stage"), r.info.status)
         for r in runs if r.info.status != "FINISHED"]
    assert {r.data.tags.get("dvc_exp_name") for r in runs} == set(names)

    for name, override in names.items():
        key, value = override.split("=")
        data = shown[name]
        assert data["params"]["params.yaml"]["data"][key] == value, name
        headline = data["metrics"]["metrics/headline.json"]["data"]
        mine = [r for r in runs if r.data.tags.get("dvc_exp_name") == name]
        # one parent per experiment, named after it and its override, every stage under it
        [parent] = [r for r in mine if "dvc_stage" not in r.data.tags]
        assert parent.info.run_name == f"{name} ({override})", parent.info.run_name
        stages = [r for r in mine if "dvc_stage" in r.data.tags]
        assert {r.data.tags["mlflow.parentRunId"] for r in stages} == {parent.info.run_id}
        for stage in MUST_RUN:
            assert sum(r.data.tags["dvc_stage"] == stage for r in stages) == 1, (name, stage)
        [evaluate] = [r for r in stages if r.data.tags["dvc_stage"] == "evaluate"]
        assert evaluate.data.params[key] == value, name
        for logged in (evaluate, parent):  # the headline, under DVC's names
            assert set(logged.data.metrics) | {"test/vs_mcp/verdict"} == set(headline), name
            for metric, number in logged.data.metrics.items():
                assert number == pytest.approx(headline[metric], rel=1e-12), (name, metric)
            assert logged.data.tags["test/vs_mcp/verdict"] == headline["test/vs_mcp/verdict"]
        artifacts = {a.path for a in client.list_artifacts(evaluate.info.run_id)}
        assert "test_metrics.json" in artifacts, (name, artifacts)
    print(f"{len(names)} experiments, -j 2: {elapsed:.0f} s")
