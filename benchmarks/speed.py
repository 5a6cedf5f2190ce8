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
TARGETS_S = {"repro": 45.0, "exp_run_loss_focal": 20.0}


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.update(DVC_NO_ANALYTICS="true", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1")
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_STAGE", "DVC_EXP_NAME"):
        env.pop(name, None)
    return env


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, dict[str, float]]:
    """Seconds ``args`` took, and per stage the seconds from DVC's ``Running stage`` line
    to the next one (the stage's command plus DVC's own work around it; ``(dvc start)``
    is what comes before the first). Exits 2 with the output if the command fails."""
    print(f"$ {' '.join(args)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    lines, marks = [], [("(dvc start)", start)]
    for line in proc.stdout:  # DVC flushes each line: its arrival time marks the stage
        lines.append(line)
        if line.startswith("Running stage '"):
            marks.append((line.split("'")[1], time.perf_counter()))
    returncode = proc.wait()
    end = time.perf_counter()
    seconds = end - start
    if returncode != 0:
        print(f"`{' '.join(args)}` failed with exit status {returncode} after "
              f"{seconds:.1f} s\n--- output ---\n{''.join(lines)[-12000:]}", file=sys.stderr)
        raise SystemExit(2)
    stages = {name: round(later - at, 2) for (name, at), (_, later)
              in zip(marks, [*marks[1:], ("", end)], strict=True)}
    print(f"  {seconds:.1f} s; stages run: {', '.join(list(stages)[1:]) or 'none'}",
          flush=True)
    for name, stage_seconds in stages.items():
        print(f"    {name:<20} {stage_seconds:6.1f} s", flush=True)
    return seconds, stages


def measure(repo: Path, ref: str, keep: bool) -> dict[str, Any]:
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", ref], capture_output=True,
                            text=True, check=True).stdout.strip()
    workdir = Path(tempfile.mkdtemp(prefix="confidnet-speed-"))
    project = workdir / "project"
    env = environment()
    # A temporary folder of its own: no warm interpreter (pipeline.warm) of an earlier run
    # serves this one; its first stage starts one, as on a fresh machine.
    env["TMPDIR"] = str(workdir / "tmp")
    (workdir / "tmp").mkdir()
    try:
        subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(repo), str(project)],
                       check=True)
        subprocess.run(["git", "-C", str(project), "checkout", "--quiet", "--detach", commit],
                       check=True)
        load_before = os.getloadavg()
        repro, repro_stages = timed(["dvc", "repro"], project, env)
        focal, focal_stages = timed(["dvc", "exp", "run", "-S", "loss=focal"], project, env)
        load_after = os.getloadavg()
    finally:
        subprocess.run(["pkill", "-f", f"pipeline.warm {workdir}"], check=False)
        if keep:
            print(f"kept {project}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return {
        "commit": commit,
        "seconds": {"repro": round(repro, 2), "exp_run_loss_focal": round(focal, 2)},
        "stage_seconds": {"repro": repro_stages, "exp_run_loss_focal": focal_stages},
        "targets_s": TARGETS_S,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
            "omp_num_threads": env.get("OMP_NUM_THREADS"),
            "confidnet_warm": env.get("CONFIDNET_WARM", "on"),
            "confidnet_tracking": env.get("CONFIDNET_TRACKING", "on"),
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
