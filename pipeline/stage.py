"""What every stage does around its work: validate params first, track the run in MLflow,
record the run (ids and what it logged) in ``runs/<stage>.json``. Bad params and unusable
data stop the stage with exit status 2 and one message, no traceback. A training stage
runs as several processes under torchrun when asked (:mod:`pipeline.distributed`); only
process 0 tracks and records the run."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn

import pipeline.distributed as ddp
from pipeline.artifacts import run_record_path
from pipeline.config import load_params
from pipeline.errors import DataError, ParamsError
from pipeline.io import atomic_write_json
from pipeline.runtime import resolve_device, seed_everything
from pipeline.tracking import StageRun, stage_run

StageBody = Callable[[dict[str, Any], StageRun], None]


def run_stage(name: str, body: StageBody, distributed: bool = False) -> None:
    """Validate ``params.yaml`` (before any work), seed, run ``body`` inside an MLflow
    run, then write ``runs/<name>.json``: the run's ids and what it logged, which
    ``python -m pipeline.replay`` replays. Bad params, and a dataset that fails its
    checks (:class:`DataError`: the MLflow run is then marked FAILED), exit with status 2
    and one message.

    A ``distributed`` (training) stage with ``nproc_per_node`` > 1 starts itself again
    under torchrun; under torchrun it joins the process group, and processes other than 0
    run ``body`` untracked and write no record. Any other stage refuses to run as more
    than one process."""
    try:
        params = load_params()
        device = resolve_device(params["device"])
        if distributed:
            ddp.relaunch(f"stages.{name}", params["nproc_per_node"])
        here = ddp.start(name, device, params["nproc_per_node"], distributed)
    except (ParamsError, RuntimeError) as error:
        _stop(error)
    seed_everything(params["seed"], device)
    try:
        if here.main:
            with stage_run(name, params) as run:
                body(params, run)
        else:
            body(params, StageRun(name))  # never started: logs nothing
    except DataError as error:
        _stop(error)
    finally:
        ddp.stop()
    if here.main:
        atomic_write_json(run_record_path(name), run.record())


def _stop(error: Exception) -> NoReturn:
    sys.stderr.write(f"error: {error}\n")
    raise SystemExit(2) from None
