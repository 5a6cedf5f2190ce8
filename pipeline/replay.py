"""Log a finished pipeline's results to MLflow again, from the records its stages wrote.

A stage whose MLflow store was down or locked still finished: its DVC outputs hold every
number, and ``runs/<stage>.json`` records what the stage logged (or tried to log): the
flattened params, the final metrics and the per-step ones, and the run's tags. Once the
store works, run from the project root::

    python -m pipeline.replay                   # every stage whose outputs exist
    python -m pipeline.replay --only-missing    # skip runs the store already holds
    python -m pipeline.replay --stage evaluate  # one stage (repeatable)

Each stage gets a new MLflow run in the experiment ``tracking.experiment`` of
``params.yaml``, in the store stages use (``MLFLOW_TRACKING_URI``, else ``mlflow.db``),
holding exactly what its record holds, plus the tags ``replayed=true`` and ``replay_of``
(the recorded run id). Nothing is recomputed. Artifacts are not logged (they are DVC
outputs).

``--only-missing`` skips a stage whose recorded run is in the store and FINISHED, or whose
record was already replayed there (tag ``replay_key``, a hash of what is logged), so it
can be rerun safely. The workspace must hold the outputs to replay: for an experiment,
``dvc exp apply <name>`` first. A stage whose ``dvc.lock`` params differ from
``params.yaml`` is skipped (its outputs do not come from these params). Nothing in the
workspace is changed. Exit status: 0 done; 1 MLflow failed, or a stage was skipped
(stale params, unreadable record); 2 bad arguments.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import dvcfile, tracking
from pipeline.artifacts import run_record_path
from pipeline.errors import READ_ERRORS
from pipeline.io import read_json


@dataclass
class Stage:
    name: str
    outputs: list[Path]
    params: dict[str, Any]  # what dvc.lock recorded for the stage, dotted keys

    def missing(self) -> list[Path]:
        return [path for path in self.outputs if not path.exists()]


def pipeline_stages(root: Path = Path()) -> list[Stage]:
    """The stages of ``dvc.yaml`` that record a run (``runs/<stage>.json`` among their
    outputs; check_params records none), in order, with their outputs and locked params."""
    locked = dvcfile.locked_params(root / "dvc.lock")
    found = []
    for name, spec in dvcfile.stages(root / "dvc.yaml").items():
        outputs = dvcfile.paths(spec, "outs", "metrics", "plots")
        if run_record_path(name) in outputs:
            found.append(Stage(name, [root / path for path in outputs], locked.get(name, {})))
    return found


def stale_params(stage: Stage, params: dict[str, Any]) -> list[str]:
    """Keys whose value in ``params.yaml`` differs from what produced the outputs."""
    return [key for key, value in stage.params.items()
            if dvcfile.lookup(params, key, dvcfile.MISSING) != value]


def _run_exists(client: Any, run_id: str) -> bool:
    """Whether ``run_id`` is in the store and FINISHED (a run cut off by a tracking failure
    stays RUNNING and is replayed)."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return False
    try:
        return client.get_run(run_id).info.status == "FINISHED"
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise


def _replayed(client: Any, experiment_id: str, key: str) -> str | None:
    found = client.search_runs(
        [experiment_id], f"tags.replay_key = '{key}' and attributes.status = 'FINISHED'",
        max_results=1)
    return found[0].info.run_id if found else None


@dataclass
class Payload:
    """What one stage's replayed run holds, read from its outputs."""

    stage: str
    context: dict[str, str]  # tags of the original run
    recorded: str  # its run id, "" when none was recorded
    params: dict[str, str]
    final: dict[str, float]
    steps: list[tuple[int, str, float]]  # (epoch, metric, value)

    def key(self) -> str:
        content = json.dumps([self.stage, self.context, self.params, self.final, self.steps],
                             sort_keys=True)
        return hashlib.sha256(content.encode()).hexdigest()[:20]


def read_payload(stage: Stage) -> Payload:
    """The payload of ``runs/<stage>.json``, as the stage recorded it."""
    record = read_json(run_record_path(stage.name))
    context = {key: str(record.get(key) or "") for key in ("dvc_exp_name", "git_commit")}
    return Payload(
        stage=stage.name, context={**context, "dvc_stage": stage.name},
        recorded=record.get("mlflow_run_id") or "",
        params={k: str(v) for k, v in record["params"].items()},
        final=tracking.finite(record["metrics"]),
        steps=[(int(step), str(key), float(value)) for step, key, value in record["steps"]],
    )


def log_payload(client: Any, experiment_id: str, payload: Payload, only_missing: bool) -> str:
    """Log one stage's run; returns what happened, for the user."""
    from mlflow.entities import Metric, Param, RunTag

    if only_missing and _run_exists(client, payload.recorded):
        return f"skipped: its run {payload.recorded} is in the store"
    key = payload.key()
    if only_missing and (done := _replayed(client, experiment_id, key)):
        return f"skipped: already replayed as run {done}"

    tags = {**payload.context, "replayed": "true", "replay_of": payload.recorded}
    run = client.create_run(experiment_id, tags=tags,
                            run_name=tracking.run_name(payload.context, payload.stage))
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in payload.final.items()]
    metrics += [Metric(k, v, now, epoch) for epoch, k, v in payload.steps]
    params = [Param(k, v) for k, v in payload.params.items()]
    for start in range(0, len(params), 100):  # MLflow's batch limits
        client.log_batch(run_id, params=params[start:start + 100])
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start:start + 1000])
    # The key last: a replay cut off half-way is not taken for a complete one.
    client.log_batch(run_id, tags=[RunTag("replay_key", key)])
    client.set_terminated(run_id, "FINISHED")
    return (f"logged run {run_id}: {len(params)} params, {len(payload.final)} final "
            f"metrics, {len(payload.steps)} per-epoch values")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.replay",
        description="Log the params and metrics of finished stages to MLflow from their DVC "
                    "outputs (after the store was unreachable or locked).")
    parser.add_argument("--stage", action="append", default=[], metavar="NAME",
                        help="a stage to replay (repeatable); default: every stage whose "
                             "outputs exist")
    parser.add_argument("--only-missing", action="store_true",
                        help="skip stages whose recorded run is in the store, or that were "
                             "already replayed")
    args = parser.parse_args(argv)

    from pipeline.config import load_params
    from pipeline.errors import ParamsError

    try:
        params = load_params()
        stages = pipeline_stages()
    except (ParamsError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    known = {s.name: s for s in stages}
    unknown = [name for name in args.stage if name not in known]
    if unknown:
        print(f"error: unknown stage {', '.join(map(repr, unknown))}; stages: "
              f"{', '.join(known)}", file=sys.stderr)
        return 2
    if args.stage:
        chosen = [known[name] for name in known if name in args.stage]
        absent = {s.name: s.missing() for s in chosen if s.missing()}
        if absent:
            for name, paths in absent.items():
                print(f"error: stage {name!r} has no outputs to replay (missing: "
                      f"{', '.join(map(str, paths))}); run `dvc repro {name}` or "
                      f"`dvc checkout`/`dvc pull` first", file=sys.stderr)
            return 2
    else:
        chosen = [s for s in stages if not s.missing()]
        if not chosen:
            print("nothing to replay: no stage has its outputs; run `dvc repro` or "
                  "`dvc pull` first", file=sys.stderr)
            return 0

    status, payloads = 0, []
    for stage in chosen:
        stale = stale_params(stage, params)
        if stale:
            print(f"{stage.name}: skipped: its outputs come from other params than "
                  f"params.yaml ({', '.join(stale)}, see dvc.lock); run `dvc repro` first",
                  file=sys.stderr)
            status = 1
            continue
        try:
            payloads.append(read_payload(stage))
        except READ_ERRORS as error:
            print(f"{stage.name}: skipped: its record {run_record_path(stage.name)} cannot be "
                  f"read ({type(error).__name__}: {error}); run `dvc checkout {stage.name}` or "
                  f"`dvc repro {stage.name}`",
                  file=sys.stderr)
            status = 1
    if not payloads:
        return status

    tracking.client_defaults()
    import mlflow

    uri = tracking.tracking_uri()
    try:
        mlflow.set_tracking_uri(uri)
        experiment_id = tracking.experiment_id(mlflow, params["tracking"]["experiment"], uri)
        client = mlflow.MlflowClient(tracking_uri=uri)
        for payload in payloads:
            outcome = log_payload(client, experiment_id, payload, args.only_missing)
            print(f"{payload.stage}: {outcome}")
    except Exception as error:  # noqa: BLE001  the store: unreachable, locked, refusing
        print(f"error: MLflow at {uri} failed ({type(error).__name__}: {error}); nothing "
              "is lost, rerun with --only-missing once it works", file=sys.stderr)
        return 1
    print(f"MLflow: {uri}, experiment {params['tracking']['experiment']!r}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
