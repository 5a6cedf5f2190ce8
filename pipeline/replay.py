"""Log a finished pipeline's results to MLflow again, from the records its stages wrote.

A stage whose MLflow store was down or locked still finished: its DVC outputs hold every
number, and ``runs/<stage>.json`` records what the stage logged (or tried to log): the
flattened params, the final metrics and tags, the per-step metrics, and what it logged on
the pipeline's parent run (the headline, for ``evaluate``). Once the store works, run from
the project root::

    python -m pipeline.replay                   # every stage whose outputs exist
    python -m pipeline.replay --only-missing    # skip runs the store already holds
    python -m pipeline.replay --stage evaluate  # one stage (repeatable)

Each stage gets a new MLflow run in the experiment ``tracking.experiment`` of
``params.yaml``, in the store stages use (``MLFLOW_TRACKING_URI``, else ``mlflow.db``),
holding exactly what its record holds, plus the tags ``replayed=true``, ``git_commit``
(``HEAD`` now) and ``dvc_exp_name`` (``DVC_EXP_NAME``, usually empty). The runs are nested
under the parent run of this commit and ``params.yaml`` (the one the stages made, if they
tracked anything, else a new one), which gets what the records logged on it. Nothing is
recomputed. Artifacts are not logged (they are DVC outputs).

``--only-missing`` skips a stage whose record the store already holds: a FINISHED run,
logged by the stage itself or by an earlier replay, tagged with the record's
``replay_key`` (a hash of its content), so it can be rerun safely. The workspace must hold
the outputs to replay: for an experiment, ``dvc exp apply <name>`` first. A stage whose
``dvc.lock`` params differ from ``params.yaml`` is skipped (its outputs do not come from
these params). Nothing in the workspace is changed. Exit status: 0 done; 1 MLflow failed,
or a stage was skipped (stale params, unreadable record); 2 bad arguments.
"""

from __future__ import annotations

import argparse
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


def _logged(client: Any, experiment_id: str, key: str) -> str | None:
    """A FINISHED run of the experiment holding the record with ``key`` (see
    :func:`pipeline.tracking.record_key`), logged by a stage or a replay."""
    found = client.search_runs(
        [experiment_id],
        f"tags.{tracking.REPLAY_KEY} = '{key}' and attributes.status = 'FINISHED'",
        max_results=1)
    return found[0].info.run_id if found else None


@dataclass
class Payload:
    """What one stage's replayed run holds, read from its outputs."""

    stage: str
    key: str  # the record's replay_key
    params: dict[str, str]
    final: dict[str, float]
    tags: dict[str, str]
    steps: list[tuple[int, str, float]]  # (epoch, metric, value)
    parent_metrics: dict[str, float]
    parent_tags: dict[str, str]


def read_payload(stage: Stage) -> Payload:
    """The payload of ``runs/<stage>.json``, as the stage recorded it."""
    record = read_json(run_record_path(stage.name))
    parent = record.get("parent") or {}
    return Payload(
        stage=stage.name, key=tracking.record_key(record),
        params={k: str(v) for k, v in record["params"].items()},
        final=tracking.finite(record["metrics"]),
        tags={k: str(v) for k, v in (record.get("tags") or {}).items()},
        steps=[(int(step), str(key), float(value)) for step, key, value in record["steps"]],
        parent_metrics=tracking.finite(parent.get("metrics") or {}),
        parent_tags={k: str(v) for k, v in (parent.get("tags") or {}).items()},
    )


def log_payload(client: Any, experiment_id: str, payload: Payload, parent_id: str,
                context: dict[str, str]) -> str:
    """Log one stage's run under ``parent_id``; returns what happened, for the user."""
    from mlflow.entities import Metric, Param, RunTag

    tags = {**context, **payload.tags, "dvc_stage": payload.stage, "replayed": "true",
            tracking.PARENT_TAG: parent_id}
    run = client.create_run(experiment_id, tags=tags,
                            run_name=tracking.run_name(context, payload.stage))
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in payload.final.items()]
    metrics += [Metric(k, v, now, epoch) for epoch, k, v in payload.steps]
    params = [Param(k, v) for k, v in payload.params.items()]
    for start in range(0, len(params), 100):  # MLflow's batch limits
        client.log_batch(run_id, params=params[start:start + 100])
    for start in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[start:start + 1000])
    if payload.parent_metrics or payload.parent_tags:
        tracking.log_to_run(client, parent_id, payload.parent_metrics, payload.parent_tags)
    # The key last: a replay cut off half-way is not taken for a complete one.
    client.log_batch(run_id, tags=[RunTag(tracking.REPLAY_KEY, payload.key)])
    client.set_terminated(run_id, "FINISHED")
    return (f"logged run {run_id}: {len(params)} params, {len(payload.final)} final "
            f"metrics, {len(payload.steps)} per-epoch values")


def replay(uri: str, params: dict[str, Any], payloads: Sequence[Payload],
           only_missing: bool) -> None:
    """Log ``payloads`` into the store at ``uri`` under this workspace's parent run, and
    print what happened to each."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment_id = tracking.experiment_id(mlflow, params["tracking"]["experiment"], uri)
    client = mlflow.MlflowClient(tracking_uri=uri)
    todo = []
    for payload in payloads:
        done = _logged(client, experiment_id, payload.key) if only_missing else None
        if done:
            print(f"{payload.stage}: skipped: the store holds its record as run {done}")
        else:
            todo.append(payload)
    if not todo:
        return
    context = tracking.dvc_context()
    context.pop("dvc_stage")
    params_path = Path("params.yaml")
    parent_id, created = tracking.parent_run(
        client, experiment_id, tracking.pipeline_key(context, params_path.read_text()),
        name=tracking.parent_name(context, tracking.changed_params(
            params, tracking.baseline_params())),
        tags={**context, "replayed": "true"}, params=tracking.flatten(params), uri=uri,
        unfinished_only=False)
    for payload in todo:
        print(f"{payload.stage}: {log_payload(client, experiment_id, payload, parent_id, context)}")
    if created:
        client.set_terminated(parent_id, "FINISHED")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.replay",
        description="Log the params and metrics of finished stages to MLflow from their DVC "
                    "outputs (after the store was unreachable or locked).")
    parser.add_argument("--stage", action="append", default=[], metavar="NAME",
                        help="a stage to replay (repeatable); default: every stage whose "
                             "outputs exist")
    parser.add_argument("--only-missing", action="store_true",
                        help="skip stages whose record the store already holds (logged by "
                             "the stage or replayed)")
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
    uri = tracking.tracking_uri()
    try:
        replay(uri, params, payloads, args.only_missing)
    except Exception as error:  # noqa: BLE001  the store: unreachable, locked, refusing
        print(f"error: MLflow at {uri} failed ({type(error).__name__}: {error}); nothing "
              "is lost, rerun with --only-missing once it works", file=sys.stderr)
        return 1
    print(f"MLflow: {uri}, experiment {params['tracking']['experiment']!r}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
