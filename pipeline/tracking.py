"""MLflow tracking for the stages: one run per stage execution, tagged with the DVC stage,
the DVC experiment name and the git commit.

Where runs go: ``MLFLOW_TRACKING_URI`` if set (e.g. a team's ``mlflow server``), else a
SQLite store ``mlflow.db`` at the project root found through ``DVC_ROOT``, so that queued
experiments, which run in temporary copies, still log to the user's store. Artifacts of
the default store go to ``mlruns/`` beside it.

Tracking never costs a result: if the store is unreachable or locked, the stage warns and
finishes; its DVC outputs hold every number and can be logged again later.
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

from pipeline.config import project_root


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


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
        self._mlflow: Any = None
        self._pending: list[Any] = []
        self._last_flush = time.monotonic()

    def _fail(self, action: str, error: Exception) -> None:
        warnings.warn(
            f"MLflow {action} failed ({type(error).__name__}: {error}); the stage goes on "
            f"without tracking and its DVC outputs keep every result",
            RuntimeWarning, stacklevel=3,
        )
        self._mlflow = None

    def start(self, experiment: str, params: Mapping[str, Any]) -> None:
        try:
            import mlflow

            uri = tracking_uri()
            mlflow.set_tracking_uri(uri)
            with _first_use_lock(uri):
                found = mlflow.get_experiment_by_name(experiment)
                if found is None:
                    location = None
                    if uri.startswith("sqlite:///") and "MLFLOW_TRACKING_URI" not in os.environ:
                        location = (project_root() / "mlruns").as_uri()
                    self.experiment_id = mlflow.create_experiment(experiment, location)
                else:
                    self.experiment_id = found.experiment_id
            name = f"{self.context['dvc_exp_name'] or 'repro'}:{self.stage}"
            run = mlflow.start_run(experiment_id=self.experiment_id, run_name=name,
                                   tags={**self.context, "dvc_stage": self.stage})
            self.run_id = run.info.run_id
            self._mlflow = mlflow
            mlflow.log_params(flatten(params))
        except Exception as error:
            self._fail("start", error)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics (NaN dropped); per-step ones are buffered and sent in batches."""
        if self._mlflow is None:
            return
        clean = {k: float(v) for k, v in metrics.items() if v == v}
        if step is None:
            try:
                self._mlflow.log_metrics(clean)
            except Exception as error:
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
        except Exception as error:
            self._fail("log_batch", error)

    def log_artifact(self, path: Path | str) -> None:
        if self._mlflow is None:
            return
        try:
            self._mlflow.log_artifact(str(path))
        except Exception as error:
            self._fail("log_artifact", error)

    def end(self, status: str) -> None:
        self.flush()
        if self._mlflow is None:
            return
        try:
            self._mlflow.end_run(status=status)
        except Exception as error:
            self._fail("end_run", error)

    def record(self) -> dict[str, Any]:
        """What the report needs to point at this run."""
        return {"stage": self.stage, "mlflow_run_id": self.run_id,
                "mlflow_experiment_id": self.experiment_id, **self.context}


@contextmanager
def _first_use_lock(uri: str) -> Iterator[None]:
    """Serialise the first opening of a SQLite store: MLflow's schema creation races when
    several processes open a fresh database at once (shared notes)."""
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
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    run = StageRun(stage)
    run.start(params["tracking"]["experiment"], params)
    try:
        yield run
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")
