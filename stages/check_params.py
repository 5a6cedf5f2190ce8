"""Stage 0: validate the whole of ``params.yaml``, before any other stage runs.

DVC deletes a stage's outputs right before running it, so a bad value caught by the stage
that reads it (``dvc exp run -S loss=foo``: train_confidnet) would cost that stage's
outputs. This stage depends on every param and every other stage depends on its output,
so DVC runs it first and stops here, with every problem, the valid values and how to get
back. It opens no MLflow run. Its output is the same bytes for any valid params: its rerun
after a change never makes another stage rerun.
"""

from __future__ import annotations

from pipeline.artifacts import PARAMS_CHECKED
from pipeline.io import atomic_write_text
from pipeline.stage import checked_params

CHECKED = "params.yaml is valid (written by stages/check_params.py)\n"

if __name__ == "__main__":
    checked_params()
    atomic_write_text(PARAMS_CHECKED, CHECKED)
