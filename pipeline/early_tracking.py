"""Imported first by every tracked stage (``stages/*.py``), before its other imports: under
DVC it starts the stage's tracking process at once
(:func:`pipeline.tracking.start_tracking_early`), so that MLflow's imports, most of that
process's work, run on another core while the stage imports torch and loads its inputs,
instead of competing with its first epochs. Outside DVC (``DVC_STAGE`` unset: a test, a
notebook, ``python -m stages.<name>`` by hand), and in torchrun's processes other than
rank 0, which do not track, and with tracking off or a bad ``CONFIDNET_TRACKING`` (which
the stage reports: :func:`pipeline.stage.run_stage`), it does nothing."""

from __future__ import annotations

import os

from pipeline.artifacts import TRACKED_STAGES
from pipeline.tracking import start_tracking_early, tracking_enabled


def _tracking_wanted() -> bool:
    try:
        return tracking_enabled()
    except ValueError:  # the stage stops with the message, before any work
        return False


if (os.environ.get("DVC_STAGE") in TRACKED_STAGES and os.environ.get("RANK", "0") == "0"
        and _tracking_wanted()):
    start_tracking_early()
