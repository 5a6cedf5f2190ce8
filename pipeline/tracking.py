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

Who makes the calls: the stage itself never imports MLflow (about 4 CPU seconds of
imports and store set-up per stage). :class:`StageRun` starts a tracking process,
``python -m pipeline.tracking`` (under DVC, the stage's first import has started it already:
:mod:`pipeline.early_tracking`), and passes it each call as a JSON line; that process logs
while the stage computes, on another core if there is one: per-step metrics in a batch
every :attr:`StageRun.FLUSH_SECONDS`, so a long run shows its progress, the rest as it
comes. :meth:`StageRun.end` waits for it, so the store is complete when the stage exits. A
stage killed before its end leaves its run and the parent run KILLED (a rerun continues the
parent).

Where runs go: ``MLFLOW_TRACKING_URI`` if set (e.g. a team's ``mlflow server``), else a
SQLite store ``mlflow.db`` at the project root found through ``DVC_ROOT``, so that queued
experiments, which run in temporary copies, still log to the user's store. Artifacts of
the default store go to ``mlruns/`` beside it.

Tracking never costs a result: if the store is unreachable or locked, or the tracking
process dies or says nothing for :meth:`StageRun.quiet_seconds` (it is then stopped), the
stage warns once and finishes; its DVC outputs hold every number, and
``python -m pipeline.replay`` logs them later from ``runs/<stage>.json`` (see
:meth:`StageRun.record`). That record holds only what the stage's inputs determine (no run
id, path or time), so it is byte-identical whenever the stage reruns on the same inputs;
runs are matched to records by the tag ``replay_key``, a hash of the record.

Failing fast: MLflow's HTTP client retries a dead server for about four minutes by default
(7 retries with exponential backoff, 120 s timeout). Stages use 1 retry and a 10 s timeout
unless ``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``MLFLOW_HTTP_REQUEST_TIMEOUT`` are set. A
locked SQLite store waits for MLflow's fixed 20 s busy timeout, once.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

from pipeline.artifacts import STAGE_ORDER
from pipeline.dvcfile import read_yaml
from pipeline.runtime import project_root, switch_on

# MLflow client settings a stage uses unless the environment sets them (see the docstring).
CLIENT_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}

# Tracking off: no tracking process, no MLflow, no store; the DVC outputs and
# runs/<stage>.json are written as always, so `python -m pipeline.replay` logs them later.
TRACKING_SWITCH = "CONFIDNET_TRACKING"

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


# MLflow's own defaults for its HTTP client (mlflow.environment_variables), for the
# variables a user may leave unset.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": 7, "MLFLOW_HTTP_REQUEST_TIMEOUT": 120,
                        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": 2,
                        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": 1.0}
BACKOFF_MAX_SECONDS = 120.0  # urllib3's Retry.DEFAULT_BACKOFF_MAX, which MLflow keeps


def longest_call_seconds(environ: Mapping[str, str]) -> float:
    """The longest one MLflow HTTP call can take under the client settings in ``environ``:
    every try times out, with urllib3's backoff between tries (``factor * 2**(n - 1)`` plus
    up to ``jitter``, at most 120 s). Unset variables take MLflow's defaults."""
    value = {name: float(environ.get(name) or default)
             for name, default in MLFLOW_HTTP_DEFAULTS.items()}
    retries = int(value["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    backoff = sum(min(BACKOFF_MAX_SECONDS,
                      value["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] * 2 ** (n - 1)
                      + value["MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"])
                  for n in range(1, retries + 1))
    return (retries + 1) * value["MLFLOW_HTTP_REQUEST_TIMEOUT"] + backoff


def tracking_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether stages track in MLflow: :data:`TRACKING_SWITCH` is ``on`` (the default, also
    when unset or empty) or ``off``. Any other value is a ``ValueError`` naming it and the
    valid ones."""
    return switch_on(TRACKING_SWITCH, environ)


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
    Serialised on a fresh SQLite store; on a server, two experiments' first stages may
    both find it missing, and the one whose creation loses the race takes the other's."""
    with _first_use_lock(uri):
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            location = (project_root() / "mlruns").as_uri() if uses_default_store(uri) else None
            try:
                return mlflow.create_experiment(name, location, tags=dict([EXPERIMENT_KIND]))
            except Exception:
                found = mlflow.get_experiment_by_name(name)
                if found is None:  # not a lost race: the store refused for another reason
                    raise
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
    """A handle on one stage's MLflow run. It records what the stage logs (for
    :meth:`record`) and passes it on to its tracking process (:class:`Companion`), which
    makes the MLflow calls while the stage works; it turns into a no-op, with one warning,
    the first time MLflow or that process fails."""

    # Per-epoch metrics are sent in batches at most this often: one database round trip
    # per epoch costs more than a small model's epoch on a CPU.
    FLUSH_SECONDS = 10.0
    # How long :meth:`end` waits for a word from the tracking process (it answers each
    # message as it is done), under the client defaults: longer than several calls take
    # (one: two HTTP tries of 10 s and a backoff, 23 s at most; SQLite's 20 s busy
    # timeout), short enough that a process stuck for good costs the stage two minutes,
    # not forever. Client settings that let a call take longer scale it
    # (:meth:`quiet_seconds`).
    QUIET_SECONDS = 120.0

    def __init__(self, stage: str) -> None:
        self.stage = stage
        # Set by the tracking process once the run exists (None until then, or without it).
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
        self._companion: Companion | None = None
        self._pending: list[list[Any]] = []  # [name, value, time in ms, step]
        self._last_flush = time.monotonic()

    def quiet_seconds(self) -> float:
        """:attr:`QUIET_SECONDS`, times how much longer one MLflow call may take under the
        client settings in force than under :data:`CLIENT_DEFAULTS` (never less): a user
        who raises ``MLFLOW_HTTP_REQUEST_TIMEOUT`` or the retries gives a slow server
        that much more time, not a stopped tracking process."""
        try:
            ratio = (longest_call_seconds(os.environ)
                     / longest_call_seconds(CLIENT_DEFAULTS))
        except ValueError:  # not a number: MLflow reports it, the floor stands
            ratio = 1.0
        return self.QUIET_SECONDS * max(1.0, ratio)

    def _fail(self, action: str, cause: Exception | str) -> None:
        """Warn once (``cause``: an exception, or ``"Type: message"`` from the tracking
        process) and stop tracking."""
        if isinstance(cause, Exception):
            cause = f"{type(cause).__name__}: {cause}"
        warnings.warn(
            f"MLflow {action} failed ({cause}); stage "
            f"{self.stage!r} goes on without tracking and its DVC outputs keep every "
            f"result. Log them later with `{REPLAY_HINT} --stage {self.stage}` "
            f"(or `{REPLAY_HINT} --only-missing` for every stage) once the store "
            f"({tracking_uri()}) works.",
            RuntimeWarning, stacklevel=4,
        )
        companion, self._companion = self._companion, None
        if companion is not None:
            companion.close(self.quiet_seconds())

    def _send(self, op: str, **fields: Any) -> None:
        """Pass one call on to the tracking process, after warning about any failure it
        reported since the last call."""
        companion = self._companion
        if companion is None:
            return
        if companion.failure is not None:
            self._fail(*companion.failure)
            return
        if companion.run_id is not None:
            self.run_id, self.parent_id = companion.run_id, companion.parent_id
        try:
            companion.send({"op": op, **fields})
        except (TypeError, ValueError) as error:  # not JSON: e.g. a table of objects
            self._fail(ACTIONS[op], error)

    def start(self, experiment: str, params: Mapping[str, Any],
              params_text: str = "") -> None:
        """Start the stage's run, nested under its pipeline's parent run (found or created,
        see the module docstring); ``params_text`` is ``params.yaml`` as written. Returns
        at once: the tracking process imports MLflow and opens the run meanwhile. With
        tracking off (:func:`tracking_enabled`) it only records the params."""
        self.params = flatten(params)
        if not tracking_enabled():
            return
        try:
            client_defaults()
            self._companion = _take_early_companion() or Companion()
        except OSError as error:
            self._fail("start", error)
            return
        self._send("start", stage=self.stage, experiment=experiment, params=dict(params),
                   params_text=params_text, context=self.context, source=sys.argv[0])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics (NaN dropped); per-step ones are buffered and sent in batches."""
        clean = finite(metrics)
        if step is None:
            self.metrics.update(clean)
            self._send("metrics", metrics=clean)
            return
        # a resumed run logs its earlier epochs again: the last value counts
        self.steps.update({(step, key): value for key, value in clean.items()})
        if self._companion is None:
            return
        now = int(time.time() * 1000)
        self._pending += [[key, value, now, step] for key, value in clean.items()]
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
        self._send("headline", metrics=clean, tags=dict(tags))

    def flush(self) -> None:
        """Send buffered per-step metrics."""
        pending, self._pending = self._pending, []
        self._last_flush = time.monotonic()
        if pending:
            self._send("steps", metrics=pending)

    def log_artifact(self, path: Path | str) -> None:
        """Log a file, which must stay in place until :meth:`end`."""
        self._send("artifact", path=str(Path(path).resolve()))

    def log_table(self, data: Mapping[str, list[Any]], artifact_file: str) -> None:
        """A table (column name -> values) as a JSON artifact the MLflow UI shows."""
        self._send("table", data=dict(data), artifact_file=artifact_file)

    def end(self, status: str) -> None:
        """End the run; the last stage ends the parent too, and a failure marks it FAILED.
        A finished run is tagged with its record's ``replay_key``. Returns once the
        tracking process has logged everything (or failed, or been silent for
        :meth:`quiet_seconds`), so that the store is complete when the stage exits."""
        self.flush()
        self._send("end", status=status,
                   replay_key=record_key(self.record()) if status == "FINISHED" else None)
        companion, self._companion = self._companion, None
        if companion is None:
            return
        problem = companion.close(self.quiet_seconds())
        self.run_id, self.parent_id = companion.run_id, companion.parent_id
        if problem is not None:
            self._fail(*problem)

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
    """An MLflow run for one stage, ended FINISHED or FAILED; with tracking off
    (:func:`tracking_enabled`), a run that records what the stage logs and sends nothing."""
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


# --- the tracking process -------------------------------------------------------------------

# The message a StageRun call sends, and the name its failure is reported under (that of
# the MLflow call it makes).
ACTIONS = {"start": "start", "metrics": "log_metrics", "steps": "log_batch",
           "headline": "log_headline", "artifact": "log_artifact", "table": "log_table",
           "end": "end_run"}


def _plain(value: Any) -> Any:
    """numpy scalars and arrays as JSON takes them (``json.dumps(default=...)``)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class Companion:
    """The stage's end of its tracking process, ``python -m pipeline.tracking``, which
    imports MLflow and makes the calls while the stage works (see the module docstring).

    Messages go as JSON lines, one per call, on the process's stdin: plain data (names,
    numbers, paths, tables), so the stage never imports MLflow, and a human can read
    them. A thread writes them, so that a slow or stuck process never blocks the stage;
    another reads the answers on its stdout: ``{"done": op}`` per message,
    ``{"run_id": ..., "parent_id": ...}`` once the run exists, and ``{"failed": action,
    "error": "Type: message"}`` once, after which the process logs nothing more."""

    def __init__(self) -> None:
        # The same code as this process: the package this module came from comes first.
        root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.tracking"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, env=env)
        self.run_id: str | None = None
        self.parent_id: str | None = None
        self.failure: tuple[str, str] | None = None
        self.ended = False
        self.last_word = time.monotonic()
        self._outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer.start()
        self._reader.start()

    def send(self, message: Mapping[str, Any]) -> None:
        self._outbox.put(json.dumps(message, allow_nan=True, default=_plain).encode() + b"\n")

    def _write(self) -> None:
        stdin = self.process.stdin
        assert stdin is not None
        # OSError: the process is gone, which the reader sees too
        with suppress(OSError):
            while (line := self._outbox.get()) is not None:
                stdin.write(line)
                stdin.flush()
        with suppress(OSError):
            stdin.close()

    def _read(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        with stdout:
            for line in stdout:
                self.last_word = time.monotonic()
                try:
                    answer = json.loads(line)
                except ValueError:  # not ours: nothing else should write there
                    continue
                if "run_id" in answer:
                    self.run_id, self.parent_id = answer["run_id"], answer["parent_id"]
                if "failed" in answer and self.failure is None:
                    self.failure = (answer["failed"], answer["error"])
                if answer.get("done") == "end":
                    self.ended = True

    def close(self, quiet_seconds: float) -> tuple[str, str] | None:
        """Let the process finish what it was sent and exit; wait while it keeps
        answering, at most ``quiet_seconds`` of silence (then stop it). Returns the
        failure to report, if any: its own, or its death or silence."""
        self._outbox.put(None)
        heard = time.monotonic()
        while self._reader.is_alive() and not self.ended:
            self._reader.join(0.2)
            heard = max(heard, self.last_word)
            if time.monotonic() - heard > quiet_seconds:
                self.process.kill()
                self.process.wait()
                return self.failure or ("end_run", f"TimeoutError: the tracking process "
                                        f"said nothing for {quiet_seconds:.0f} s; stopped it")
        try:
            status = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:  # done, but slow to exit: nothing is lost
            self.process.kill()
            status = self.process.wait()
        if self.failure is not None or self.ended:
            return self.failure
        return ("end_run", f"ChildProcessError: the tracking process exited with status "
                f"{status} before the run ended")


_early_companion: Companion | None = None


def start_tracking_early() -> None:
    """Start the tracking process of the stage this process is about to run, before the
    stage's imports (torch's take 1.5 s): it imports MLflow meanwhile, on another core.
    :mod:`pipeline.early_tracking` calls it under DVC; :meth:`StageRun.start` takes the
    process. Unused (a stage stopped by bad params or missing inputs), it exits when this
    process does, having logged nothing."""
    global _early_companion
    if _early_companion is None:
        client_defaults()
        _early_companion = Companion()


def _take_early_companion() -> Companion | None:
    global _early_companion
    companion, _early_companion = _early_companion, None
    if companion is not None and companion.process.poll() is not None:
        return None
    return companion


class Tracker:
    """What the tracking process does with each message: the MLflow calls of one stage
    run (see :class:`StageRun`, whose calls they are)."""

    def __init__(self) -> None:
        self.mlflow: Any = None
        self.stage = ""
        self.run_id: str | None = None
        self.parent_id: str | None = None

    def start(self, stage: str, experiment: str, params: Mapping[str, Any],
              params_text: str, context: Mapping[str, str], source: str) -> None:
        """``source``: the stage's ``sys.argv[0]``, from which MLflow takes the run's
        source tags (``mlflow.source.name``, its git commit and branch), as it did when
        the stage made the calls itself."""
        sys.argv[0] = source
        import mlflow

        self.stage = stage
        uri = tracking_uri()
        mlflow.set_tracking_uri(uri)
        experiment_ = experiment_id(mlflow, experiment, uri)
        parent_context = {k: v for k, v in context.items() if k != "dvc_stage"}
        flat = flatten(params)
        self.parent_id, _ = parent_run(
            mlflow.MlflowClient(), experiment_, pipeline_key(context, params_text),
            name=parent_name(context, changed_params(params, baseline_params())),
            tags=parent_context, params=flat, uri=uri)
        run = mlflow.start_run(experiment_id=experiment_, run_name=run_name(context, stage),
                               parent_run_id=self.parent_id,
                               tags={**context, "dvc_stage": stage})
        self.run_id = run.info.run_id
        self.mlflow = mlflow
        mlflow.log_params(flat)

    def metrics(self, metrics: Mapping[str, float]) -> None:
        self.mlflow.log_metrics(dict(metrics))

    def steps(self, metrics: list[list[Any]]) -> None:
        """Per-step metrics, ``[name, value, time in ms, step]`` (MLflow takes at most
        1,000 per batch)."""
        from mlflow.entities import Metric

        entries = [Metric(key, value, timestamp, step) for key, value, timestamp, step in metrics]
        client = self.mlflow.MlflowClient()
        for start in range(0, len(entries), 1000):
            client.log_batch(self.run_id, metrics=entries[start:start + 1000])

    def headline(self, metrics: Mapping[str, float], tags: Mapping[str, str]) -> None:
        self.mlflow.set_tags(dict(tags))
        log_to_run(self.mlflow.MlflowClient(), self.parent_id, metrics, tags)

    def artifact(self, path: str) -> None:
        self.mlflow.log_artifact(path)

    def table(self, data: dict[str, list[Any]], artifact_file: str) -> None:
        self.mlflow.log_table(data=data, artifact_file=artifact_file)

    def end(self, status: str, replay_key: str | None) -> None:
        if replay_key is not None:
            self.mlflow.set_tag(REPLAY_KEY, replay_key)
        self.mlflow.end_run(status=status)
        if self.parent_id and (status != "FINISHED" or self.stage == FINAL_STAGE):
            self.mlflow.MlflowClient().set_terminated(self.parent_id, status)


def serve(inbox: IO[bytes], outbox: IO[str]) -> None:
    """The tracking process: do what each message of ``inbox`` asks (a
    :class:`Tracker` method), answering on ``outbox``, until the run ends. After the first
    failure it only reads. If the stage dies before ending its run (``inbox`` closes), the
    run ends KILLED, as a failed stage's would end FAILED."""
    tracker, working = Tracker(), True

    def answer(**fields: Any) -> None:
        outbox.write(json.dumps(fields) + "\n")
        outbox.flush()

    for line in inbox:
        message = json.loads(line)
        op = message.pop("op")
        if working:
            try:
                getattr(tracker, op)(**message)
                if op == "start":
                    answer(run_id=tracker.run_id, parent_id=tracker.parent_id)
            except Exception as error:  # noqa: BLE001  reported; the stage goes on
                answer(failed=ACTIONS.get(op, op), error=f"{type(error).__name__}: {error}")
                working = False
        answer(done=op)
        if op == "end":
            return
    if working and tracker.mlflow is not None:
        with suppress(Exception):
            tracker.end("KILLED", None)


def main() -> None:
    """``python -m pipeline.tracking``, started by :class:`StageRun`: messages on stdin,
    answers on stdout. Anything else that writes to stdout (MLflow, a library) goes to
    stderr instead, with the stage's own messages."""
    from pipeline.warm import run_in_warm_interpreter

    run_in_warm_interpreter()  # under DVC, in a process that has imported MLflow already
    # Ctrl-C reaches the whole process group: the stage ends its run FAILED, which this
    # process must stay alive to log.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    # MLflow's imports first, most of this process's work: started early (see
    # start_tracking_early), it does them while its stage starts up; for a database
    # (the default SQLite store, or PostgreSQL), its store's code too, half the imports.
    from mlflow.store.db.db_types import DATABASE_ENGINES

    if tracking_uri().split(":", 1)[0].split("+", 1)[0] in DATABASE_ENGINES:
        import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    serve(sys.stdin.buffer, answers)
    # Every call has returned, so the store holds the run; MLflow's teardown at a normal
    # exit (about 0.5 s) would only keep the stage waiting.
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
