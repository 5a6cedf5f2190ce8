"""How a stage's process ends (``pipeline.stage.run_stage_process``): at once, without the
interpreter's teardown, yet after what it registered to run at exit and with its output
flushed; under a profiler the ordinary way, so that the profile is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO, subprocess_env

# A stage whose work is done; the object's __del__ runs only in the interpreter's teardown.
# Run as `python -m stages.evaluate` (argv[1] "program": the spec python -m gives __main__)
# or by another program.
FINISHED_STAGE = """
import atexit, importlib.util, sys
from pathlib import Path
from pipeline import stage

if sys.argv[1] == "program":
    sys.modules["__main__"].__spec__ = importlib.util.find_spec("stages.evaluate")

class TornDown:
    def __del__(self):
        sys.stderr.write("torn down\\n")

kept = TornDown()
atexit.register(lambda: Path("atexit.txt").write_text("ran"))
stage.run_stage = lambda *args, **kwargs: None  # the stage itself: done, outputs written
sys.stdout.write("buffered, not flushed")
try:
    stage.run_stage_process("evaluate", lambda params, run: None)
except SystemExit as stop:
    sys.stderr.write(f"back in the program, status {stop.code}\\n")
"""


def run_script(tmp_path: Path, *before: str,
               run_as: str = "program") -> subprocess.CompletedProcess[str]:
    script = tmp_path / "stage.py"
    script.write_text(FINISHED_STAGE)
    return subprocess.run([sys.executable, *before, str(script), run_as], cwd=tmp_path,
                          text=True,
                          capture_output=True, timeout=600,
                          env=subprocess_env({"PYTHONPATH": str(REPO)}))


def test_a_stage_process_ends_at_once_after_its_exit_functions(tmp_path: Path) -> None:
    proc = run_script(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "buffered, not flushed"
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert "torn down" not in proc.stderr  # no teardown


def test_under_a_profiler_a_stage_process_exits_the_ordinary_way(tmp_path: Path) -> None:
    proc = run_script(tmp_path, "-m", "cProfile", "-o", str(tmp_path / "profile.out"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "profile.out").stat().st_size > 0
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert "torn down" in proc.stderr


def test_run_by_another_program_a_stage_returns_to_it(tmp_path: Path) -> None:
    """As benchmarks/gpu_check.py runs the stages: in its own process, which goes on."""
    proc = run_script(tmp_path, run_as="by another program")
    assert proc.returncode == 0, proc.stderr
    assert "back in the program, status 0" in proc.stderr
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert "torn down" in proc.stderr
