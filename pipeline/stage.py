"""What every stage does around its work: validate params first, check that its inputs
exist, track the run in MLflow, record what it logged in ``runs/<stage>.json``. Bad
params, missing inputs and unusable data stop the stage with exit status 2 and one
message, no traceback. A training stage runs as several processes under torchrun when
asked (:mod:`pipeline.distributed`); only process 0 tracks and records the run. A stage
that computes with numpy alone (download, evaluate, report) says so and never imports torch,
whose import costs seconds of every stage that does."""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import pipeline.distributed as ddp
from pipeline.artifacts import STAGE_ORDER, missing_inputs, producers, run_record_path
from pipeline.config import load_params
from pipeline.errors import DataError, ParamsError
from pipeline.io import atomic_write_json
from pipeline.runtime import check_device, resolve_device, seed_everything, seed_host
from pipeline.tracking import StageRun, stage_run, tracking_enabled
from pipeline.warm import check_setting as check_warm_setting

PARAMS = Path("params.yaml")
StageBody = Callable[[dict[str, Any], StageRun], None]

# How to get back after a bad value: `dvc exp run -S key=value` composes params.yaml from
# conf/ with the value and leaves it there when the pipeline stops. Composing it again is
# what works: `git checkout params.yaml` may do nothing, as DVC rewrites the file and git's
# index within one second (same size, same second: git takes it for unchanged).
RECOVERY = (
    "params.yaml now holds the value(s) above; no output was deleted. To get back, compose "
    "it again from conf/:\n"
    "  `python -m pipeline.settings` (with your overrides, if any; `git checkout conf/` first "
    "if you edited a preset),\n"
    "  or rerun with a valid value: `dvc exp run -S key=value`.")


def checked_params(device: bool = True) -> dict[str, Any]:
    """``params.yaml``, validated, and (``device``) the device it names there to use;
    else stop with status 2, every problem, and how to get back (:data:`RECOVERY`).
    Neither imports torch unless params name CUDA (:func:`pipeline.runtime.check_device`)."""
    try:
        params = load_params(PARAMS)
        if device:
            check_device(params["device"])
        return params
    except (ParamsError, RuntimeError) as error:
        _stop(f"{error}\n  {RECOVERY}" if PARAMS.is_file() else error)


def missing_inputs_message(stage: str) -> str | None:
    """One line naming the inputs of ``stage`` that are absent and the command that makes
    them (their producing stages, from :data:`pipeline.artifacts.STAGES`); None when all
    are there."""
    missing = missing_inputs(stage)
    if not missing:
        return None
    # Every file the stages read or write has a suffix; folders (data, features) have none.
    names = [f"{path.as_posix()}/" if not path.suffix else path.as_posix() for path in missing]
    listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
    made_by = [s for s in STAGE_ORDER if any(s in producers(path) for path in missing)]
    shipped = [path.as_posix() for path in missing if not producers(path)]
    it = "it" if len(missing) - len(shipped) == 1 else "them"
    fixes = [f"make {it} with: dvc repro {' '.join(made_by)}"] if made_by else []
    fixes += [f"restore {' '.join(shipped)} with: git checkout -- {' '.join(shipped)}"] \
        if shipped else []
    return f"{listed} {'is' if len(missing) == 1 else 'are'} missing; {'; '.join(fixes)}"


def run_stage(name: str, body: StageBody, distributed: bool = False,
              uses_torch: bool = True) -> None:
    """Validate ``params.yaml``, ``CONFIDNET_TRACKING`` and ``CONFIDNET_WARM``, and check
    that the stage's inputs exist (before any work and before any MLflow run), seed, run
    ``body`` inside an MLflow run (unless tracking is off), then write
    ``runs/<name>.json``: what it logged, which ``python -m pipeline.replay`` replays. Bad
    params, a bad ``CONFIDNET_TRACKING`` or ``CONFIDNET_WARM`` and missing inputs exit
    with status 2 and one message; so does a dataset that fails its checks
    (:class:`DataError`), after the MLflow run is marked FAILED.

    A ``distributed`` (training) stage with ``nproc_per_node`` > 1 starts itself again
    under torchrun; under torchrun it joins the process group, and processes other than 0
    run ``body`` untracked and write no record. Any other stage refuses to run as more
    than one process.

    A stage that does not ``uses_torch`` (numpy only) is given no device: params'
    ``device`` is neither checked nor resolved, and only Python and numpy are seeded, so
    torch is never imported."""
    if distributed and not uses_torch:
        raise ValueError(f"stage {name!r}: a distributed stage trains, with torch")
    params = checked_params(device=uses_torch)
    device = resolve_device(params["device"]) if uses_torch else None
    try:
        tracking_enabled()
        check_warm_setting()
    except ValueError as error:
        _stop(error)
    missing = missing_inputs_message(name)
    if missing:
        _stop(missing)
    try:
        if distributed:
            ddp.relaunch(f"stages.{name}", params["nproc_per_node"])
        here = ddp.start(name, device, params["nproc_per_node"], distributed)
    except (ParamsError, RuntimeError) as error:
        _stop(error)
    if uses_torch:
        seed_everything(params["seed"], device)
    else:
        seed_host(params["seed"])
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


def run_stage_process(name: str, body: StageBody, distributed: bool = False,
                      uses_torch: bool = True) -> NoReturn:
    """``python -m stages.<name>``: :func:`run_stage`, then end the process at once (see
    :func:`end_process`). Only where the stage is the program (``python -m``): run by
    another program in its own process (``runpy.run_module`` without ``alter_sys``, as
    ``benchmarks/gpu_check.py`` does), under a profiler or a debugger (``python -m
    cProfile`` writes its profile after the stage returns), or stopped by an error, it
    exits the ordinary way (:class:`SystemExit`)."""
    run_stage(name, body, distributed=distributed, uses_torch=uses_torch)
    program = getattr(sys.modules.get("__main__"), "__spec__", None)
    if (getattr(program, "name", None) == f"stages.{name}" and sys.getprofile() is None
            and sys.gettrace() is None):
        end_process()
    raise SystemExit(0)


def end_process() -> NoReturn:
    """Exit with status 0 without the interpreter's teardown, which frees every module one
    by one: about 0.6 s once torch is imported, on the path of every training stage. What
    the process registered to run at exit runs first (logging's flush, tqdm's monitor,
    weakref finalizers), then the standard streams are flushed; the stage's files are
    written and closed by then."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _stop(error: Exception | str) -> NoReturn:
    sys.stderr.write(f"error: {error}\n")
    raise SystemExit(2) from None
