"""MLflow tracking: one parent run per pipeline execution, holding the headline metrics
(``pipeline.headline``) and the params, with one nested run per stage execution (its
params, final metrics, per-epoch curves and artifacts), tagged with the DVC stage, the DVC
experiment name and the git commit.

Finding the parent: each stage is its own process, so the parent is found again by a
deterministic key, the tag ``pipeline_key``: a hash of the DVC experiment name
(``DVC_EXP_NAME``, set by ``dvc exp run``) or, under ``dvc repro``, of the git commit and
the content of ``params.yaml``. The first stage that runs creates the parent (under a file
lock on SQLite, so parallel experiments cannot race), the next ones find it while it is
unfinished, and the last stage (``report``) ends it. A stage that fails marks it FAILED; a
rerun with the same key (``dvc repro`` after a fix, same commit and params) continues it.
The parent is named after the experiment and the params that differ from the baseline
commit's ``params.yaml`` (``git show HEAD:params.yaml``), e.g. ``prime-sick (loss=focal)``.

Where runs go: ``MLFLOW_TRACKING_URI`` if set (e.g. a team's ``mlflow server``), else a
SQLite store ``mlflow.db`` at the project root found through ``DVC_ROOT``, so that queued
experiments, which run in temporary copies, still log to the user's store. Artifacts of
the default store go to ``mlruns/`` beside it.

Tracking never costs a result: if the store is unreachable or locked, the stage warns and
finishes; its DVC outputs hold every number, and ``python -m pipeline.replay`` logs them
later from ``runs/<stage>.json`` (see :meth:`StageRun.record`). That record holds only what
the stage's inputs determine (no run id, path or time), so it is byte-identical whenever
the stage reruns on the same inputs; runs are matched to records by the tag
``replay_key``, a hash of the record.

Failing fast: MLflow's HTTP client retries a dead server for about four minutes by default
(7 retries with exponential backoff, 120 s timeout). Stages use 1 retry and a 10 s timeout
unless ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT`` are set. A
locked SQLite store waits for MLflow's fixed 20 s busy timeout, once.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.artifacts import STAGE_ORDER
from pipeline.dvcfile import read_yaml
from pipeline.runtime import project_root

# MLflow client settings a stage uses unless the environment sets them (see the docstring).
CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}

REPLAY_HINT = "python -m pipeline.replay"
# The stage that ends the parent run.
FINAL_STAGE = STAGE_ORDER[-1]
PIPELINE_KEY = "pipeline_key"
REPLAY_KEY = "replay_key"
PARENT_TAG = "mlflow.parentRunId"  # how the MLflow UI nests a run under another
# Tells MLflow 3 UIs that read it to open the experiment on its runs table, not the GenAI
# overview (MLflow 3.17's "GenAI / Model training" switch overrides it; see README).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# Params named in the parent's name before "+N more".
NAMED_CHANGES = 3


def client_defaults() -> None:
    """Fail fast on a dead server; the user's environment wins. Call before MLflow is used
    (MLflow reads these variables on each request)."""
    for name, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(name, value)


def default_tracking_uri() -> str:
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                             timeout=10)
        return out.stdout
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str:
    out = _git("rev-parse", "HEAD")
    return out.strip() if out else "unknown"


def dvc_context() -> dict[str, str]:
    return {
        "dvc_stage": os.environ.get("DVC_STAGE", ""),
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "git_commit": git_commit(),
    }


def uses_default_store(uri: str) -> bool:
    # Not "MLFLOW_TRACKING_URI is unset": mlflow.set_tracking_uri sets it.
    return uri == default_tracking_uri()


def experiment_id(mlflow: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created if needed (artifacts of the default store
    go to ``mlruns/`` beside ``mlflow.db``) and tagged to open on its runs table.
    Serialised on a fresh SQLite store."""
    with _first_use_lock(uri):
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            location = (project_root() / "mlruns").as_uri() if uses_default_store(uri) else None
            return mlflow.create_experiment(name, location, tags=dict([EXPERIMENT_KIND]))
        if EXPERIMENT_KIND[0] not in found.tags:  # a store made before the tag existed
            mlflow.MlflowClient().set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
        return found.experiment_id


def run_name(context: Mapping[str, str], stage: str) -> str:
    return f"{context.get('dvc_exp_name') or 'repro'}:{stage}"


# --- the parent run -------------------------------------------------------------------------


def pipeline_key(context: Mapping[str, str], params_text: str) -> str:
    """What every stage of one pipeline execution shares (see the module docstring)."""
    exp = context.get("dvc_exp_name")
    parts = ["exp", exp] if exp else ["repro", context.get("git_commit", ""), params_text]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def baseline_params() -> dict[str, Any] | None:
    """``params.yaml`` of the commit the run starts from (``HEAD``: the baseline of a
    ``dvc exp run``); None outside git or when the commit has none."""
    text = _git("show", "HEAD:params.yaml")
    if text is None:
        return None
    loaded = read_yaml(text)  # as params.yaml itself is read (pipeline.config)
    return loaded if isinstance(loaded, dict) else None


def changed_params(params: Mapping[str, Any],
                   baseline: Mapping[str, Any] | None) -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every param that differs from ``baseline``, in
    ``params.yaml`` order (a key ``params`` lacks has the value None)."""
    if baseline is None:
        return []
    ours, theirs = flatten(params), flatten(baseline)
    keys = list(ours) + [k for k in theirs if k not in ours]
    return [(k, ours.get(k)) for k in keys if ours.get(k) != theirs.get(k)]


def parent_name(context: Mapping[str, str], changes: list[tuple[str, Any]]) -> str:
    """``prime-sick (loss=focal)``; ``repro 1a2b3c4`` under ``dvc repro``."""
    name = context.get("dvc_exp_name") or f"repro {context.get('git_commit', '')[:7]}"
    if not changes:
        return name
    shown = [f"{key}={value}" for key, value in changes[:NAMED_CHANGES]]
    if len(changes) > NAMED_CHANGES:
        shown.append(f"+{len(changes) - NAMED_CHANGES} more")
    return f"{name} ({', '.join(shown)})"


def parent_run(client: Any, experiment: str, key: str, *, name: str,
               tags: Mapping[str, str], params: Mapping[str, Any], uri: str,
               unfinished_only: bool = True) -> tuple[str, bool]:
    """The id of the parent run with ``key`` (the latest unfinished one, or with
    ``unfinished_only=False`` the latest of any status), created with ``name``, ``tags``
    and ``params`` if there is none; and whether it was created. A FAILED parent that is
    continued is RUNNING again."""
    from mlflow.entities import Param

    with _first_use_lock(uri):
        found = [run for run in client.search_runs(
                     [experiment], f"tags.{PIPELINE_KEY} = '{key}'",
                     order_by=["attributes.start_time DESC"], max_results=100)
                 if not unfinished_only or run.info.status != "FINISHED"]
        if found:
            run_id = found[0].info.run_id
            if unfinished_only and found[0].info.status != "RUNNING":
                client.update_run(run_id, status="RUNNING")
            return run_id, False
        run = client.create_run(experiment, run_name=name, tags={**tags, PIPELINE_KEY: key})
        entries = [Param(k, str(v)) for k, v in params.items()]
        for start in range(0, len(entries), 100):  # MLflow's batch limit
            client.log_batch(run.info.run_id, params=entries[start:start + 100])
        return run.info.run_id, True


# --- what a stage logs --------------------------------------------------------------------


def classifier_summary_metrics(summary: Mapping[str, float]) -> dict[str, float]:
    """The train_classifier stage's final metrics from metrics/classifier.json, prefixed
    ``best_`` so they do not collide with the per-epoch curves of the same names."""
    return {k if k.startswith("best_") else f"best_{k}": v for k, v in summary.items()}


def confidnet_summary_metrics(summary: Mapping[str, float]) -> dict[str, float]:
    """The final metrics of train_confidnet and finetune, from their metrics/*.json."""
    names = {"best_epoch": "best_epoch", "val_aupr_error": "best_val_aupr_error",
             "train_errors": "train_errors"}
    return {names[k]: v for k, v in summary.items() if k in names}


def evaluation_tables(results: Mapping[str, Mapping[str, Any]],
                      intervals: Mapping[str, Mapping[str, Any]],
                      significance: Mapping[str, Any]) -> dict[str, dict[str, list[Any]]]:
    """The evaluate stage's full results as MLflow tables (``mlflow.log_table``: column
    name -> values), one file each, instead of hundreds of metrics: ``results`` maps a
    split (val, test) to metrics/validation.json or metrics/evaluate.json, ``intervals`` is
    metrics/intervals.json and ``significance`` metrics/significance.json."""
    tables: dict[str, dict[str, list[Any]]] = {}
    for split, result in results.items():
        rows = [{"method": method, **values} for method, values in result["methods"].items()]
        tables[f"{split}_metrics.json"] = _columns(rows)
    tables["test_intervals.json"] = _columns(
        [{"method": method, "metric": name, "ci_low": low, "ci_high": high}
         for method, values in intervals.items() for name, (low, high) in values.items()])
    tables["test_paired_differences.json"] = _columns(
        [{"challenger": challenger, "baseline": baseline, "metric": metric, **values}
         for challenger, baselines in significance.items()
         for baseline, metrics in baselines.items() for metric, values in metrics.items()])
    return tables


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    names = list(dict.fromkeys(name for row in rows for name in row))
    return {name: [row.get(name) for row in rows] for name in names}


def finite(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Metrics as floats, NaN and None dropped (MLflow cannot compare them)."""
    out = {}
    for key, value in metrics.items():
        if value is None:
            continue
        value = float(value)
        if value == value:
            out[key] = value
    return out


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def record_key(record: Mapping[str, Any]) -> str:
    """The ``replay_key`` of a stage record: a hash of its JSON content, the same for the
    live run (tagged when it ends) and for :mod:`pipeline.replay`, which reads it back."""
    content = json.dumps(record, sort_keys=True, allow_nan=True)
    return hashlib.sha256(content.encode()).hexdigest()[:20]


class StageRun:
    """A handle that logs to MLflow while it works and turns into a no-op, with one
    warning, the first time MLflow fails."""

    # Per-epoch metrics are sent in batches at most this often: one database round trip
    # per epoch costs more than a small model's epoch on a CPU.
    FLUSH_SECONDS = 10.0

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.run_id: str | None = None
        self.parent_id: str | None = None
        self.context = dvc_context()
        # What the run logs, kept whether MLflow works or not: runs/<stage>.json records
        # it and `python -m pipeline.replay` replays exactly that.
        self.params: dict[str, Any] = {}
        self.metrics: dict[str, float] = {}
        self.tags: dict[str, str] = {}
        self.steps: dict[tuple[int, str], float] = {}
        self.parent: dict[str, dict[str, Any]] = {"metrics": {}, "tags": {}}
        self._mlflow: Any = None
        self._pending: list[Any] = []
        self._last_flush = time.monotonic()

    def _fail(self, action: str, error: Exception) -> None:
        warnings.warn(
            f"MLflow {action} failed ({type(error).__name__}: {error}); stage "
            f"{self.stage!r} goes on without tracking and its DVC outputs keep every "
            f"result. Log them later with `{REPLAY_HINT} --stage {self.stage}` "
            f"(or `{REPLAY_HINT} --only-missing` for every stage) once the store "
            f"({tracking_uri()}) works.",
            RuntimeWarning, stacklevel=3,
        )
        self._mlflow = None

    def start(self, experiment: str, params: Mapping[str, Any],
              params_text: str = "") -> None:
        """Start the stage's run, nested under its pipeline's parent run (found or created,
        see the module docstring); ``params_text`` is ``params.yaml`` as written."""
        self.params = flatten(params)
        try:
            client_defaults()
            import mlflow

            uri = tracking_uri()
            mlflow.set_tracking_uri(uri)
            experiment_ = experiment_id(mlflow, experiment, uri)
            context = {k: v for k, v in self.context.items() if k != "dvc_stage"}
            self.parent_id, _ = parent_run(
                mlflow.MlflowClient(), experiment_, pipeline_key(self.context, params_text),
                name=parent_name(self.context, changed_params(params, baseline_params())),
                tags=context, params=self.params, uri=uri)
            run = mlflow.start_run(experiment_id=experiment_,
                                   run_name=run_name(self.context, self.stage),
                                   parent_run_id=self.parent_id,
                                   tags={**self.context, "dvc_stage": self.stage})
            self.run_id = run.info.run_id
            self._mlflow = mlflow
            mlflow.log_params(self.params)
        except Exception as error:  # noqa: BLE001  tracking never costs a result
            self._fail("start", error)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics (NaN dropped); per-step ones are buffered and sent in batches."""
        clean = finite(metrics)
        if step is None:
            self.metrics.update(clean)
        else:  # a resumed run logs its earlier epochs again: the last value counts
            self.steps.update({(step, key): value for key, value in clean.items()})
        if self._mlflow is None:
            return
        if step is None:
            try:
                self._mlflow.log_metrics(clean)
            except Exception as error:  # noqa: BLE001  tracking never costs a result
                self._fail("log_metrics", error)
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(key, value, now, step) for key, value in clean.items()]
        if time.monotonic() - self._last_flush > self.FLUSH_SECONDS:
            self.flush()

    def log_headline(self, metrics: Mapping[str, float], tags: Mapping[str, str]) -> None:
        """The pipeline's headline: final metrics (and words, as tags) of this run and of
        the parent run, under the same names."""
        self.log_metrics(metrics)
        clean = finite(metrics)
        self.tags.update(tags)
        self.parent["metrics"].update(clean)
        self.parent["tags"].update(tags)
        if self._mlflow is None:
            return
        try:
            self._mlflow.set_tags(dict(tags))
            log_to_run(self._mlflow.MlflowClient(), self.parent_id, clean, tags)
        except Exception as error:  # noqa: BLE001  tracking never costs a result
            self._fail("log_headline", error)

    def flush(self) -> None:
        """Send buffered per-step metrics (MLflow takes at most 1,000 per batch)."""
        pending, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        if self._mlflow is None or not pending:
            return
        try:
            client = self._mlflow.MlflowClient()
            for start in range(0, len(pending), 1000):
                client.log_batch(self.run_id, metrics=pending[start:start + 1000])
        except Exception as error:  # noqa: BLE001  tracking never costs a result
            self._fail("log_batch", error)

    def log_artifact(self, path: Path | str) -> None:
        if self._mlflow is None:
            return
        try:
            self._mlflow.log_artifact(str(path))
        except Exception as error:  # noqa: BLE001  tracking never costs a result
            self._fail("log_artifact", error)

    def log_table(self, data: Mapping[str, list[Any]], artifact_file: str) -> None:
        """A table (column name -> values) as a JSON artifact the MLflow UI shows."""
        if self._mlflow is None:
            return
        try:
            self._mlflow.log_table(data=dict(data), artifact_file=artifact_file)
        except Exception as error:  # noqa: BLE001  tracking never costs a result
            self._fail("log_table", error)

    def end(self, status: str) -> None:
        """End the run; the last stage ends the parent too, and a failure marks it FAILED.
        A finished run is tagged with its record's ``replay_key``."""
        self.flush()
        if self._mlflow is None:
            return
        try:
            if status == "FINISHED":
                self._mlflow.set_tag(REPLAY_KEY, record_key(self.record()))
            self._mlflow.end_run(status=status)
            if self.parent_id and (status != "FINISHED" or self.stage == FINAL_STAGE):
                self._mlflow.MlflowClient().set_terminated(self.parent_id, status)
        except Exception as error:  # noqa: BLE001  tracking never costs a result
            self._fail("end_run", error)

    def record(self) -> dict[str, Any]:
        """What this run logged, for replay: the flattened params, the final metrics and
        tags, the per-step metrics as sorted ``[step, name, value]``, and what it logged on
        the parent run. Only what the stage's inputs determine: no run id, path or time,
        so rerunning the stage on the same inputs writes the same bytes."""
        record = {"stage": self.stage, "params": self.params, "metrics": self.metrics,
                  "tags": self.tags, "parent": self.parent,
                  "steps": [[step, key, value]
                            for (step, key), value in sorted(self.steps.items())]}
        # as read back from runs/<stage>.json (tuples become lists), so keys agree
        normalised: dict[str, Any] = json.loads(json.dumps(record, allow_nan=True))
        return normalised


def log_to_run(client: Any, run_id: str | None, metrics: Mapping[str, float],
               tags: Mapping[str, str]) -> None:
    """Final metrics and tags on another run than the active one (the parent)."""
    from mlflow.entities import Metric, RunTag

    if run_id is None:
        return
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])


@contextmanager
def _first_use_lock(uri: str) -> Iterator[None]:
    """Serialise the first opening of a SQLite store: MLflow's schema creation races when
    several processes open a fresh database at once (seen with MLflow 3 on SQLite)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    db_path = Path(uri.removeprefix("sqlite:///"))
    db_path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db_path) + ".lock", timeout=300):
        yield


@contextmanager
def stage_run(stage: str, params: Mapping[str, Any]) -> Iterator[StageRun]:
    """An MLflow run for one stage, ended FINISHED or FAILED."""
    client_defaults()
    run = StageRun(stage)
    text = Path("params.yaml")
    run.start(params["tracking"]["experiment"], params,
              text.read_text() if text.exists() else "")
    try:
        yield run
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")
