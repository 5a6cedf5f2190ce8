"""MLflow tracking for the stages: one run per stage execution, tagged with the DVC stage,
the DVC experiment name and the git commit.

Where runs go: ``MLFLOW_TRACKING_URI`` if set (e.g. a team's ``mlflow server``), else a
SQLite store ``mlflow.db`` at the project root found through ``DVC_ROOT``, so that queued
experiments, which run in temporary copies, still log to the user's store. Artifacts of
the default store go to ``mlruns/`` beside it.

Tracking never costs a result: if the store is unreachable or locked, the stage warns and
finishes; its DVC outputs hold every number, and ``python -m pipeline.replay`` logs them
later from ``runs/<stage>.json`` (see :meth:`StageRun.record`).

Failing fast: MLflow's HTTP client retries a dead server for about four minutes by default
(7 retries with exponential backoff, 120 s timeout). Stages use 1 retry and a 10 s timeout
unless ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT`` are set. A
locked SQLite store waits for MLflow's fixed 20 s busy timeout, once.
"""

from __future__ import annotations

import os
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.runtime import project_root

# MLflow client settings a stage uses unless the environment sets them (see the docstring).
CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}

REPLAY_HINT = "python -m pipeline.replay"


def client_defaults() -> None:
    """Fail fast on a dead server; the user's environment wins. Call before MLflow is used
    (MLflow reads these variables on each request)."""
    for name, value in CLIENT_DEFAULTS.items():
        os.environ.setdefault(name, value)


def default_tracking_uri() -> str:
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=10)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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
    go to ``mlruns/`` beside ``mlflow.db``). Serialised on a fresh SQLite store."""
    with _first_use_lock(uri):
        found = mlflow.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = (project_root() / "mlruns").as_uri() if uses_default_store(uri) else None
        return mlflow.create_experiment(name, location)


def run_name(context: Mapping[str, str], stage: str) -> str:
    return f"{context.get('dvc_exp_name') or 'repro'}:{stage}"


def classifier_summary_metrics(summary: Mapping[str, float]) -> dict[str, float]:
    """The train_classifier stage's final metrics from metrics/classifier.json, prefixed
    ``best_`` so they do not collide with the per-epoch curves of the same names."""
    return {k if k.startswith("best_") else f"best_{k}": v for k, v in summary.items()}


def confidnet_summary_metrics(summary: Mapping[str, float]) -> dict[str, float]:
    """The final metrics of train_confidnet and finetune, from their metrics/*.json."""
    names = {"best_epoch": "best_epoch", "val_aupr_error": "best_val_aupr_error",
             "train_errors": "train_errors"}
    return {names[k]: v for k, v in summary.items() if k in names}


def evaluation_metrics(results: Mapping[str, Mapping[str, Any]],
                       intervals: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """The evaluate stage's MLflow metrics, named from its outputs: ``results`` maps a
    split (val, test) to metrics/validation.json or metrics/evaluate.json, ``intervals``
    is metrics/intervals.json. Names: ``<split>/<method>/<metric>``,
    ``test/<method>/<metric>_ci_low|high``, ``<split>/size``, ``<split>/errors``."""
    metrics: dict[str, float] = {}
    for split, result in results.items():
        for method, values in result["methods"].items():
            metrics.update({f"{split}/{method}/{name}": v for name, v in values.items()})
    for method, values in intervals.items():
        for name, bounds in values.items():
            low, high = bounds
            metrics[f"test/{method}/{name}_ci_low"] = low
            metrics[f"test/{method}/{name}_ci_high"] = high
    for split, result in results.items():
        metrics.update({f"{split}/{key}": result[key] for key in ("size", "errors")})
    return metrics


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


class StageRun:
    """A handle that logs to MLflow while it works and turns into a no-op, with one
    warning, the first time MLflow fails."""

    # Per-epoch metrics are sent in batches at most this often: one database round trip
    # per epoch costs more than a small model's epoch on a CPU.
    FLUSH_SECONDS = 10.0

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.context = dvc_context()
        # What the run logs, kept whether MLflow works or not: runs/<stage>.json records
        # it and `python -m pipeline.replay` replays exactly that.
        self.params: dict[str, Any] = {}
        self.metrics: dict[str, float] = {}
        self.steps: dict[tuple[int, str], float] = {}
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

    def start(self, experiment: str, params: Mapping[str, Any]) -> None:
        self.params = flatten(params)
        try:
            client_defaults()
            import mlflow

            uri = tracking_uri()
            mlflow.set_tracking_uri(uri)
            self.experiment_id = experiment_id(mlflow, experiment, uri)
            run = mlflow.start_run(experiment_id=self.experiment_id,
                                   run_name=run_name(self.context, self.stage),
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

    def end(self, status: str) -> None:
        self.flush()
        if self._mlflow is None:
            return
        try:
            self._mlflow.end_run(status=status)
        except Exception as error:  # noqa: BLE001  tracking never costs a result
            self._fail("end_run", error)

    def record(self) -> dict[str, Any]:
        """Where this run went (for the report) and what it logged (for replay): the
        flattened params, the final metrics and the per-step ones as ``[step, name,
        value]``."""
        return {"stage": self.stage, "mlflow_run_id": self.run_id,
                "mlflow_experiment_id": self.experiment_id, **self.context,
                "params": self.params, "metrics": self.metrics,
                "steps": [[step, key, value] for (step, key), value in self.steps.items()]}


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
    run.start(params["tracking"]["experiment"], params)
    try:
        yield run
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")
