"""A shared tracking server, as a lab runs it (README, "Scaling out"): a real ``mlflow
server`` on 127.0.0.1 with a PostgreSQL backend store (Debian's PostgreSQL in a temporary
cluster, tests/pgserver.py) and proxied artifacts (``--serve-artifacts`` into a temporary
``--artifacts-destination``), the pipeline reaching it only through MLFLOW_TRACKING_URI.

Three queued experiments run two at a time (two at once, the third restoring what they
share from DVC's run cache) and every record their stages wrote
(``runs/<stage>.json``, a DVC output of each experiment) is on the server as a FINISHED run
holding the same params, final metrics and whole per-epoch curves, nested under its
experiment's parent run, with its artifacts readable through the server. Then a stage runs
while the server is down (PostgreSQL up), finishes with one warning per stage, and
``python -m pipeline.replay`` fills the restarted server with the same, complete, runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    MLFLOW_SERVER_ENV,
    QUEUED_OVERRIDES,
    STAGES,
    experiment_output,
    experiments_shown,
    free_port,
    make_project,
    run,
    run_queue,
    subprocess_env,
)
from pgserver import PostgresServer, missing_reason, running_postgres

from pipeline.artifacts import STAGES as STAGE_FILES
from pipeline.artifacts import run_record_path
from pipeline.tracking import PARENT_TAG, REPLAY_KEY, finite, record_key

pytestmark = [pytest.mark.scaleout, pytest.mark.slow]

QUEUE_TIMEOUT_S = 3000  # a bound for a busy two-core machine, not a timing assertion
RAN = re.compile(r"Running stage '([^']+)'")
EXPERIMENT = "confidnet"  # tracking.experiment in params.yaml


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    with running_postgres() as server:
        yield server


class TrackingServer:
    """``mlflow server`` with a PostgreSQL backend store and proxied artifacts, at a fixed
    port so that it can be stopped and started again at the same URL."""

    def __init__(self, backend_uri: str, workdir: Path) -> None:
        self.backend_uri = backend_uri
        self.workdir = workdir
        self.artifacts = workdir / "artifacts"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def command(self) -> list[str]:
        """The README's command, with one worker (the tests share two cores)."""
        return ["mlflow", "server", "--backend-store-uri", self.backend_uri,
                "--artifacts-destination", str(self.artifacts), "--serve-artifacts",
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def start(self, timeout_s: float = 300) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        log = self.workdir / f"server-{self.starts}.log"
        # Its own session: `mlflow server` runs uvicorn as a child, and stop() ends the
        # whole group. No job runner (conftest.MLFLOW_SERVER_ENV).
        env = subprocess_env(MLFLOW_SERVER_ENV)
        with log.open("wb") as log_file:
            self.proc = subprocess.Popen(self.command(), cwd=self.workdir, env=env,
                                         stdin=subprocess.DEVNULL, stdout=log_file,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while not self.healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server did not answer {self.url}/health:\n"
                                   f"{log.read_text()[-5000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        # what is left of the group (uvicorn exits after its parent)
        deadline = time.monotonic() + 10
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
        assert not self.healthy(), f"{self.url} still answers after stop"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def tracking_server(postgres: PostgresServer, tmp_path: Path,
                    request: pytest.FixtureRequest) -> Iterator[TrackingServer]:
    """A started server on a database of its own (one per test)."""
    database = re.sub(r"\W", "_", request.node.name)[:60].lower()
    server = TrackingServer(postgres.create_database(database), tmp_path / "server")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def client(server: TrackingServer) -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=server.url)


def all_runs(server: TrackingServer) -> list[Any]:
    c = client(server)
    experiment = c.get_experiment_by_name(EXPERIMENT)
    if experiment is None:
        return []
    return list(c.search_runs([experiment.experiment_id], max_results=5000))


def check_run_holds(server: TrackingServer, found: Any, record: dict[str, Any]) -> int:
    """``found`` is FINISHED and holds exactly what ``record`` (a runs/<stage>.json) holds:
    the params, every final metric, the whole curve of every per-epoch metric, the tags;
    returns how many metric values it holds."""
    stage = record["stage"]
    assert found.info.status == "FINISHED", (stage, found.info.status)
    assert found.data.tags[REPLAY_KEY] == record_key(record), stage
    assert found.data.tags["dvc_stage"] == stage
    assert found.data.params == {k: str(v) for k, v in record["params"].items()}, stage
    final = finite(record["metrics"])
    curves: dict[str, list[tuple[int, float]]] = {}
    for step, name, value in record["steps"]:
        curves.setdefault(name, []).append((step, value))
    assert not set(final) & set(curves), stage  # else a curve's history holds the final value
    assert set(found.data.metrics) == set(final) | set(curves), stage
    for name, value in final.items():
        assert found.data.metrics[name] == value, (stage, name)
    values = len(final)
    for name, want in curves.items():
        history = client(server).get_metric_history(found.info.run_id, name)
        assert sorted((m.step, m.value) for m in history) == sorted(want), (stage, name)
        values += len(history)
    for name, value in (record.get("tags") or {}).items():
        assert found.data.tags[name] == str(value), (stage, name)
    return values


def check_parent_holds(found: Any, records: list[dict[str, Any]]) -> None:
    """The parent run ended FINISHED holding what the stages logged on it (the headline)."""
    assert found.info.status == "FINISHED", found.info.status
    for record in records:
        parent = record.get("parent") or {}
        for name, value in finite(parent.get("metrics") or {}).items():
            assert found.data.metrics[name] == value, name
        for name, value in (parent.get("tags") or {}).items():
            assert found.data.tags[name] == str(value), name


def dvc_output_bytes(project: Path, rev: str, stage: str, name: str) -> bytes | None:
    """The bytes of the DVC output of ``stage`` that an artifact called ``name`` was logged
    from (a file output of that name, or a file of that name in a directory output)."""
    import dvc.api
    from dvc.exceptions import PathMissingError

    for out in STAGE_FILES[stage].outputs:
        for candidate in (out, out / name):
            if candidate.name != name:
                continue
            try:
                return bytes(dvc.api.read(str(candidate), repo=str(project), rev=rev,
                                          mode="rb"))
            except (PathMissingError, FileNotFoundError, IsADirectoryError,
                    NotADirectoryError):  # not this output, or not a directory
                continue
    return None


def check_artifacts(server: TrackingServer, found: Any, project: Path, rev: str,
                    dest: Path) -> int:
    """Every artifact of ``found`` downloads through the server's proxy and equals the DVC
    output it was logged from (tables, which are no output, parse as JSON); returns the
    number of artifacts."""
    import mlflow

    stage = found.data.tags["dvc_stage"]
    assert found.info.artifact_uri.startswith("mlflow-artifacts:"), found.info.artifact_uri
    listed = client(server).list_artifacts(found.info.run_id)
    (dest / found.info.run_id).mkdir(parents=True, exist_ok=True)
    for artifact in listed:
        assert not artifact.is_dir, (stage, artifact.path)
        local = Path(mlflow.artifacts.download_artifacts(
            run_id=found.info.run_id, artifact_path=artifact.path,
            dst_path=str(dest / found.info.run_id), tracking_uri=server.url))
        got = local.read_bytes()
        want = dvc_output_bytes(project, rev, stage, artifact.path)
        if want is None:
            assert stage == "evaluate" and isinstance(json.loads(got), dict), (stage, artifact)
        else:
            assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest(), \
                (stage, artifact.path)
        # the proxy stored it under --artifacts-destination
        assert any(p.name == artifact.path for p in server.artifacts.rglob("*")), artifact
    return len(listed)


def test_three_queued_experiments_log_complete_runs_to_the_server(
        tracking_server: TrackingServer, tmp_path: Path) -> None:
    server = tracking_server
    project = make_project(tmp_path / "project")
    # Completeness is under test here, not fail-fast (the down-server test covers that): on
    # a loaded machine the pipeline's 10 s request timeout can lapse while several stages and
    # the server share two cores, and the stage would then rightly go on untracked.
    env = {"MLFLOW_TRACKING_URI": server.url, "MLFLOW_HTTP_REQUEST_TIMEOUT": "120",
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3"}
    names: dict[str, str] = {}
    for override in QUEUED_OVERRIDES:
        out = run(project, ["dvc", "exp", "run", "--queue", "-S", override], env=env).stdout
        match = re.search(r"Queued experiment '([\w.-]+)'", out)
        assert match, out
        names[match[1]] = override

    started = time.monotonic()
    statuses = run_queue(project, set(names), 2, QUEUE_TIMEOUT_S, env=env)
    elapsed = time.monotonic() - started
    logs = {n: run(project, ["dvc", "queue", "logs", n], check=False).stdout for n in names}
    failed = {n: s for n, s in statuses.items() if s != "Success"}
    assert not failed, f"{failed}\n" + "\n".join(f"--- {n}\n{logs[n][-3000:]}" for n in failed)
    for name, log in logs.items():  # no stage lost its tracking
        assert "goes on without tracking" not in log, (name, log[-3000:])

    shown = experiments_shown(project)
    runs = all_runs(server)
    parents = {r.data.tags.get("dvc_exp_name"): r for r in runs if "dvc_stage" not in r.data.tags}
    stage_runs = [r for r in runs if "dvc_stage" in r.data.tags]
    assert set(parents) == set(names) and len(parents) == len(runs) - len(stage_runs), \
        sorted(r.info.run_name for r in runs)
    parent_ids = {p.info.run_id for p in parents.values()}
    assert all(r.data.tags[PARENT_TAG] in parent_ids for r in stage_runs)
    # Runs by record. Two experiments running at once may both compute a stage they share
    # (before either fills the run cache): two runs of one record, each under its parent.
    by_key: dict[str, list[Any]] = {}
    for r in stage_runs:
        by_key.setdefault(r.data.tags[REPLAY_KEY], []).append(r)

    values = artifacts = 0
    for name, override in names.items():
        parent = parents[name]
        assert parent.info.run_name == f"{name} ({override})", parent.info.run_name
        ran = set(RAN.findall(logs[name]))
        mine = [r for r in stage_runs if r.data.tags[PARENT_TAG] == parent.info.run_id]
        # one run per stage the experiment ran (the others came from DVC's run cache)
        assert sorted(r.data.tags["dvc_stage"] for r in mine) == sorted(ran & set(STAGES)), \
            (name, ran)
        records = []
        for stage in STAGES:  # every record of the experiment is on the server, complete
            record = experiment_output(project, shown[name], str(run_record_path(stage)))
            records.append(record)
            found = by_key.get(record_key(record), [])
            assert found, f"{name}: {stage}'s record is not on the server"
            if stage in ran:  # its own run, under its parent
                found = [r for r in found if r.data.tags[PARENT_TAG] == parent.info.run_id]
                assert len(found) == 1, (name, stage, len(found))
            # else restored from the run cache: the run of the experiment that computed it
            values += check_run_holds(server, found[0], record)
        check_parent_holds(parent, records)
    for r in stage_runs:
        exp = r.data.tags["dvc_exp_name"]
        artifacts += check_artifacts(server, r, project, shown[exp]["rev"], tmp_path / "dl")
    print(f"\n{len(names)} experiments, dvc queue start -j 2, against {server.url} on PostgreSQL: "
          f"{elapsed:.0f} s; on the server: {len(parents)} parent runs, {len(stage_runs)} "
          f"stage runs, {values} metric values checked, {artifacts} artifacts through the "
          f"proxy")


def test_stage_run_while_server_is_down_finishes_then_replay_fills_it(
        tracking_server: TrackingServer, tmp_path: Path) -> None:
    server = tracking_server
    project = make_project(tmp_path / "project")
    env = {"MLFLOW_TRACKING_URI": server.url}
    server.stop()  # PostgreSQL stays up

    started = time.monotonic()
    proc = run(project, ["dvc", "repro", "train_classifier"], env=env)
    elapsed = time.monotonic() - started
    output = proc.stdout + proc.stderr
    warned = [line for line in output.splitlines() if "MLflow start failed" in line]
    down = ["download", "train_classifier"]
    assert len(warned) == len(down), output
    for stage, line in zip(down, warned, strict=True):
        assert f"stage '{stage}' goes on without tracking" in line, line
        assert f"python -m pipeline.replay --stage {stage}" in line, line
        assert server.url in line, line
    records = {stage: json.loads((project / run_record_path(stage)).read_text())
               for stage in down}

    server.start()
    assert all_runs(server) == []
    replayed = run(project, [sys.executable, "-m", "pipeline.replay"], env=env).stdout
    runs = all_runs(server)
    [parent] = [r for r in runs if "dvc_stage" not in r.data.tags]
    values = 0
    for stage, record in records.items():
        [found] = [r for r in runs if r.data.tags.get("dvc_stage") == stage]
        assert found.data.tags["replayed"] == "true"
        assert found.data.tags[PARENT_TAG] == parent.info.run_id
        values += check_run_holds(server, found, record)
    check_parent_holds(parent, list(records.values()))
    assert len(runs) == len(down) + 1

    again = run(project, [sys.executable, "-m", "pipeline.replay", "--only-missing"],
                env=env).stdout
    assert again.count("skipped: the store holds its record") == len(down), again
    assert len(all_runs(server)) == len(runs)
    print(f"\n`dvc repro train_classifier` with {server.url} down: {elapsed:.0f} s; "
          f"warning:\n{warned[0].strip()}\nreplay:\n{replayed}"
          f"on the server: {len(runs)} runs, {values} metric values checked")
