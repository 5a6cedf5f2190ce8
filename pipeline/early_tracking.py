"""Imported first by every tracked stage (``stages/*.py``), before its other imports: under
DVC it hands the stage to a warm interpreter where it can (:mod:`pipeline.warm`), then
starts the stage's tracking process at once
(:func:`pipeline.tracking.start_tracking_early`), so that MLflow's imports, most of that
process's work, run on another core while the stage imports torch and loads its inputs,
instead of competing with its first epochs. Outside DVC (``DVC_STAGE`` unset: a test, a
notebook, ``python -m stages.<name>`` by hand), and in torchrun's processes other than
rank 0, which do not track, and with tracking off or a bad ``CONFIDNET_TRACKING`` (which
the stage reports: :func:`pipeline.stage.run_stage`), it does nothing."""

from __future__ import annotations

# Before anything else: under DVC, this stage may run in a warm interpreter that has
# imported torch and MLflow already (pipeline.warm); this process then only waits for it.
from pipeline.warm import run_in_warm_interpreter

run_in_warm_interpreter()

# isort: split
import os  # noqa: E402

from pipeline.artifacts import TRACKED_STAGES  # noqa: E402
from pipeline.tracking import start_tracking_early, tracking_enabled  # noqa: E402


def _tracking_wanted() -> bool:
    try:
        return tracking_enabled()
    except ValueError:  # the stage stops with the message, before any work
        return False


if (os.environ.get("DVC_STAGE") in TRACKED_STAGES and os.environ.get("RANK", "0") == "0"
        and _tracking_wanted()):
    start_tracking_early()
