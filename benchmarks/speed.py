"""Wall time of the pipeline as a user meets it, against the project's targets.

From a fresh clone of the repository at a commit (default: HEAD of this checkout), with
the default ``params.yaml``:

(a) ``dvc repro``: the whole pipeline from nothing (no outputs, no DVC cache);
(b) then ``dvc exp run -S loss=focal``: the experiment a user tries next, which reruns
    train_confidnet, finetune, evaluate and report.

Prints both figures in seconds, checks them against the targets and exits 1 if one is
missed (2 if a command fails). ``--out FILE`` also writes the figures as JSON.

Run it with the project's virtualenv, from anywhere::

    .venv/bin/python benchmarks/speed.py --out speed.json

``python`` and ``dvc`` are taken from the interpreter's own bin directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TARGETS_S = {"repro": 180.0, "exp_run_loss_focal": 45.0}


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(DVC_NO_ANALYTICS="true", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME"):
        env.pop(name, None)
    return env


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Seconds ``args`` took; exits 2 with its output if it fails."""
    print(f"$ {' '.join(args)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(args, cwd=cwd, env=env, text=True, capture_output=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"`{' '.join(args)}` failed with exit status {proc.returncode} after "
              f"{seconds:.1f} s\n--- stdout ---\n{proc.stdout[-6000:]}\n"
              f"--- stderr ---\n{proc.stderr[-6000:]}", file=sys.stderr)
        raise SystemExit(2)
    ran = [line.split("'")[1] for line in (proc.stdout + proc.stderr).splitlines()
           if line.startswith("Running stage '")]
    print(f"  {seconds:.1f} s; stages run: {', '.join(ran) or 'none'}", flush=True)
    return seconds


def measure(repo: Path, ref: str, keep: bool) -> dict[str, Any]:
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", ref], capture_output=True,
                            text=True, check=True).stdout.strip()
    workdir = Path(tempfile.mkdtemp(prefix="confidnet-speed-"))
    project = workdir / "project"
    env = environment()
    try:
        subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(repo), str(project)],
                       check=True)
        subprocess.run(["git", "-C", str(project), "checkout", "--quiet", "--detach", commit],
                       check=True)
        load_before = os.getloadavg()
        repro = timed(["dvc", "repro"], project, env)
        focal = timed(["dvc", "exp", "run", "-S", "loss=focal"], project, env)
        load_after = os.getloadavg()
    finally:
        if keep:
            print(f"kept {project}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "commit": commit,
        "seconds": {"repro": round(repro, 2), "exp_run_loss_focal": round(focal, 2)},
        "targets_s": TARGETS_S,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
            "omp_num_threads": env.get("OMP_NUM_THREADS"),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--repo", type=Path, default=REPO,
                        help="repository to clone (default: this checkout)")
    parser.add_argument("--ref", default="HEAD", help="commit to measure (default: HEAD)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone")
    args = parser.parse_args(argv)

    result = measure(args.repo.resolve(), args.ref, args.keep)
    missed = [name for name, seconds in result["seconds"].items()
              if seconds > TARGETS_S[name]]
    result["passed"] = not missed
    print()
    for name, seconds in result["seconds"].items():
        verdict = "MISSED" if name in missed else "ok"
        print(f"{name:<20} {seconds:8.1f} s   target {TARGETS_S[name]:6.0f} s   {verdict}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
