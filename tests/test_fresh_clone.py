"""A clean dvc.lock, and errors that lose nothing, with real git and DVC.

The session's reproduced and committed project (conftest.baseline, dvc.lock included) is
the starting point:

- a `git clone` of it (the git history only: no DVC cache, no outputs; conftest's
  ``twin_projects["offline"]``) reproduces every stage and leaves `git status --porcelain`
  empty: every DVC output has the bytes the committed dvc.lock records;
- in a copy of it, a param change reruns only the stages that read it (check_params, whose
  output never changes, makes nothing else rerun), and a second `dvc repro` does nothing;
- `dvc exp run -S loss=foo` stops at check_params with the valid values and how to get
  back, and deletes no output; composing params.yaml again makes it all up to date.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest
from conftest import UNTRACKED, Baseline, Reproduced, run

from pipeline.artifacts import STAGE_ORDER, STAGES

pytestmark = pytest.mark.slow

RUNNING = re.compile(r"Running stage '([^']+)'")
LOSS_READERS = ["check_params", "train_confidnet", "finetune", "evaluate", "report"]


def output_of(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def outputs(project: Path) -> dict[str, str]:
    """sha256 of every file of every stage's outputs, by path."""
    found = {}
    for stage in STAGE_ORDER:
        for out in STAGES[stage].outputs:
            path = project / out
            for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
                if file.is_file():
                    found[file.relative_to(project).as_posix()] = \
                        hashlib.sha256(file.read_bytes()).hexdigest()
    return found


@pytest.fixture(scope="module")
def committed(baseline: Baseline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the session's project, reproduced and committed (at the fast budget)."""
    project = baseline.copy(tmp_path_factory.mktemp("fresh_clone") / "project")
    assert run(project, ["git", "status", "--porcelain"]).stdout == ""
    return project


def test_fresh_clone_reproduces_the_committed_lock(
        committed: Path, twin_projects: dict[str, Reproduced]) -> None:
    clone = twin_projects["offline"].path  # cloned with no cache and no outputs (conftest)
    ran = RUNNING.findall(twin_projects["offline"].output)
    assert sorted(ran) == sorted(STAGE_ORDER), ran

    status = run(clone, ["git", "status", "--porcelain"]).stdout
    ours, theirs = outputs(committed), outputs(clone)
    differ = sorted(name for name in ours.keys() | theirs.keys()
                    if ours.get(name) != theirs.get(name))
    assert status == "" and not differ, (
        f"git status --porcelain in the clone:\n{status}\noutputs that differ from the "
        f"committed run: {differ}\n{run(clone, ['git', 'diff', 'dvc.lock']).stdout}")


def test_a_param_change_reruns_only_the_stages_that_read_it(committed: Path) -> None:
    # only the stages that read `loss`: not download, train_classifier, ... (check_params
    # reruns on every change, and its output is the same bytes)
    run(committed, ["python", "-m", "pipeline.settings", "loss=focal"])
    before = outputs(committed)
    ran = RUNNING.findall(output_of(run(committed, ["dvc", "repro"], env=UNTRACKED)))
    assert ran == LOSS_READERS, ran
    after = outputs(committed)
    assert after["runs/check_params.txt"] == before["runs/check_params.txt"]
    assert after["models/classifier.pt"] == before["models/classifier.pt"]
    again = output_of(run(committed, ["dvc", "repro"]))
    assert "Running stage" not in again, again

    run(committed, ["git", "checkout", "HEAD", "--", "params.yaml", "dvc.lock"])
    run(committed, ["dvc", "checkout", "--force"])


def test_bad_value_stops_before_dvc_deletes_any_output(committed: Path) -> None:
    assert "up to date" in output_of(run(committed, ["dvc", "status"]))
    before = outputs(committed)
    assert {"models/confidnet.pt", "scores/confidnet.npz"} <= before.keys()

    proc = run(committed, ["dvc", "exp", "run", "-S", "loss=foo"], check=False)
    out = output_of(proc)
    assert proc.returncode != 0, out
    assert RUNNING.findall(out) == ["check_params"], out
    assert "loss = 'foo': valid values: bce, focal, mse, ranking" in out, out
    assert "params.yaml now holds the value(s) above; no output was deleted" in out, out
    assert "`python -m pipeline.settings`" in out and "`dvc exp run -S key=value`" in out, out
    assert "Traceback" not in out, out
    assert outputs(committed) == before  # train_confidnet's outputs included, byte for byte
    assert "\nloss: foo\n" in (committed / "params.yaml").read_text()

    # the way back the message gives (`git checkout params.yaml` may do nothing here: DVC
    # rewrites params.yaml and git's index in the same second, and git then sees no change)
    run(committed, ["python", "-m", "pipeline.settings"])
    status = output_of(run(committed, ["dvc", "status"]))
    assert "up to date" in status, status
    assert run(committed, ["git", "status", "--porcelain"]).stdout == ""
