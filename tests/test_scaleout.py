"""Beyond one machine: clones of the project that meet through a bare git remote and a DVC
remote, as machines of a lab would (README, "Scaling out").

Machine A holds the pipeline reproduced once (a copy of the session's project,
conftest.baseline) and pushes its outputs and run cache; a
fresh clone with an empty cache pulls them and `dvc repro` recomputes nothing, once through
an SSH remote served by a real OpenSSH ``sshd`` on 127.0.0.1 (tests/sshd.py) and once
through a local folder. Then A runs an experiment and pushes it (`dvc exp push`), another
clone pulls it (`dvc exp pull`), lists it, applies it without recomputing, and reruns the
same experiment on a third clone from the pushed run cache without recomputing either.

Every command that talks to a remote runs with an empty ``HOME`` and no SSH agent: the
remote's settings in ``.dvc/config`` and ``.dvc/config.local`` are all it needs.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import UNTRACKED, Baseline, experiments_shown, run
from sshd import INSTALL_HINT, SSHServer, find_sshd, running_sshd

pytestmark = [pytest.mark.scaleout, pytest.mark.slow]

RUNNING = re.compile(r"Running stage '([^']+)'")
SKIPPED = re.compile(r"Stage '([^']+)' didn't change, skipping")
FROM_RUN_CACHE = re.compile(r"Stage '([^']+)' is cached - skipping run, checking out outputs")
EXP_NAME = re.compile(r"Ran experiment\(s\): ([\w.-]+)")
UP_TO_DATE = "Data and pipelines are up to date."


@dataclass
class Machines:
    """A bare git repository (``origin``) and machine A's clone, reproduced and pushed."""

    root: Path
    origin: Path
    a: Path
    home: Path  # an empty HOME for commands that reach a remote
    stages: list[str]
    timings: dict[str, float] = field(default_factory=dict)

    def clone(self, name: str) -> Path:
        """A fresh machine: `git clone` of origin, with an empty DVC cache."""
        dest = self.root / name
        run(self.root, ["git", "clone", "-q", str(self.origin), str(dest)])
        for key, value in (("user.name", name), ("user.email", f"{name}@example.invalid"),
                           ("commit.gpgsign", "false")):
            run(dest, ["git", "config", key, value])
        assert not (dest / ".dvc" / "cache").exists()
        return dest

    def remote_env(self) -> dict[str, str]:
        # No ~/.ssh (keys, config, known_hosts), no agent, no global DVC or git config.
        return {"HOME": str(self.home), "SSH_AUTH_SOCK": "", "XDG_CONFIG_HOME": str(self.home)}


@dataclass(frozen=True)
class Remote:
    """A DVC remote: its URL, shared through git, and the settings each machine keeps in
    its own ``.dvc/config.local`` (credentials, and here the test server's port)."""

    name: str
    url: str
    per_machine: dict[str, str]
    default: bool = False  # the remote `dvc exp run --pull` and plain `dvc push` use

    def add(self, machines: Machines) -> None:
        """On A: add the remote, commit .dvc/config and push it (once)."""
        a = machines.a
        if self.name in run(a, ["dvc", "remote", "list"]).stdout.split():
            return
        run(a, ["dvc", "remote", "add", *(["-d"] if self.default else []), self.name, self.url])
        run(a, ["git", "add", ".dvc/config"])
        run(a, ["git", "commit", "-q", "-m", f"DVC remote {self.name}"])
        run(a, ["git", "push", "-q", "origin", "main"])
        self.configure(a)

    def configure(self, clone: Path) -> None:
        for key, value in self.per_machine.items():
            run(clone, ["dvc", "remote", "modify", "--local", self.name, key, value])


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def timed(machines: Machines, label: str, clone: Path, args: list[str],
          env: dict[str, str] | None = None) -> str:
    started = time.monotonic()
    out = output(run(clone, args, env=env))
    machines.timings[label] = time.monotonic() - started
    return out


def assert_nothing_recomputed(clone: Path, stages: list[str]) -> str:
    """`dvc status` has nothing to do and `dvc repro` skips every stage; returns what
    `dvc status` said."""
    status = output(run(clone, ["dvc", "status"]))
    assert UP_TO_DATE in status, status
    repro = output(run(clone, ["dvc", "repro"]))
    assert not RUNNING.findall(repro), repro
    assert sorted(SKIPPED.findall(repro)) == sorted(stages), repro
    return status.strip()


@pytest.fixture(scope="module")
def machines(baseline: Baseline,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machines]:
    """Machine A after `dvc repro` (a copy of the session's reproduced and committed
    project), pushed to a bare origin: the one pipeline run the push/pull tests share."""
    root = tmp_path_factory.mktemp("machines")
    origin = root / "origin.git"
    run(root, ["git", "init", "-q", "--bare", "-b", "main", str(origin)])
    a = baseline.copy(root / "a")
    home = root / "home"
    home.mkdir()
    stages = list(yaml.safe_load((a / "dvc.yaml").read_text())["stages"])
    machines = Machines(root=root, origin=origin, a=a, home=home, stages=stages)
    assert sorted(RUNNING.findall(baseline.output)) == sorted(stages), baseline.output
    assert run(a, ["git", "status", "--porcelain"]).stdout == ""
    run(a, ["git", "remote", "add", "origin", str(origin)])
    run(a, ["git", "push", "-q", "-u", "origin", "main"])
    yield machines
    print("\n" + "\n".join(f"{label}: {s:.1f} s" for label, s in machines.timings.items()))


@pytest.fixture(scope="module")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHServer]:
    if find_sshd() is None:
        pytest.fail(f"the SSH remote tests need sshd: {INSTALL_HINT}", pytrace=False)
    if importlib.util.find_spec("dvc_ssh") is None:
        pytest.fail("the SSH remote tests need DVC's SSH support: pip install 'dvc[ssh]' "
                    "(in the dev extra)", pytrace=False)
    with running_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def ssh_remote(machines: Machines, server: SSHServer) -> Remote:
    # The URL is what every machine shares; user, key and (here) port are each machine's.
    return Remote("shared-ssh", f"ssh://{server.host}{machines.root / 'ssh-store'}",
                  {"user": server.user, "keyfile": str(server.keyfile),
                   "port": str(server.port)}, default=True)


def local_remote(machines: Machines) -> Remote:
    return Remote("shared-folder", str(machines.root / "folder-store"), {})


@pytest.mark.parametrize("kind", ["ssh", "local"])
def test_fresh_clone_pulls_and_recomputes_nothing(machines: Machines, kind: str,
                                                  request: pytest.FixtureRequest) -> None:
    if kind == "ssh":
        remote = ssh_remote(machines, request.getfixturevalue("sshd_server"))
    else:
        remote = local_remote(machines)
    remote.add(machines)
    env = machines.remote_env()
    pushed = timed(machines, f"A: dvc push ({kind})", machines.a,
                   ["dvc", "push", "-r", remote.name, "--run-cache"], env)
    assert re.search(r"\d+ files? pushed", pushed), pushed

    b = machines.clone(f"b_{kind}")
    remote.configure(b)
    missing = output(run(b, ["dvc", "status"]))
    assert UP_TO_DATE not in missing and "deleted:" in missing, missing
    pulled = timed(machines, f"B: dvc pull ({kind})", b,
                   ["dvc", "pull", "-r", remote.name, "--run-cache"], env)
    assert re.search(r"\d+ files? (fetched|added)", pulled), pulled
    print(f"\n[{kind}] B, dvc status after dvc pull: "
          f"{assert_nothing_recomputed(b, machines.stages)}")
    for metrics in sorted((machines.a / "metrics").glob("*.json")):
        assert (b / "metrics" / metrics.name).read_bytes() == metrics.read_bytes(), metrics.name


def test_experiments_meet_through_git_and_dvc_remotes(machines: Machines,
                                                      sshd_server: SSHServer) -> None:
    remote = ssh_remote(machines, sshd_server)
    remote.add(machines)
    env = machines.remote_env()
    a, b = machines.a, machines.clone("b_exp")
    remote.configure(b)

    ran = timed(machines, "A: dvc exp run -S seed=1", a,
                ["dvc", "exp", "run", "-S", "seed=1", "-n", "seed1-on-a"], UNTRACKED)
    assert sorted(RUNNING.findall(ran)) == sorted(machines.stages), ran  # seed reruns all
    assert EXP_NAME.findall(ran) == ["seed1-on-a"], ran
    on_a = experiments_shown(a)["seed1-on-a"]
    pushed = timed(machines, "A: dvc exp push", a,
                   ["dvc", "exp", "push", "-r", remote.name, "--run-cache", "origin",
                    "seed1-on-a"], env)
    assert "seed1-on-a" in pushed, pushed

    # No name: every experiment of HEAD, as the README's aggregation step pulls them.
    pulled = timed(machines, "B: dvc exp pull", b,
                   ["dvc", "exp", "pull", "-r", remote.name, "origin"], env)
    assert "seed1-on-a" in pulled, pulled
    shown = experiments_shown(b)
    assert "seed1-on-a" in shown, list(shown)
    on_b: dict[str, Any] = shown["seed1-on-a"]
    assert on_b["params"]["params.yaml"]["data"]["seed"] == 1
    assert on_b["metrics"] and on_b["metrics"] == on_a["metrics"]

    # Its outputs, from the DVC remote: nothing to recompute.
    run(b, ["dvc", "exp", "apply", "seed1-on-a"])
    run(b, ["dvc", "checkout"])
    assert yaml.safe_load((b / "params.yaml").read_text())["seed"] == 1
    assert_nothing_recomputed(b, machines.stages)
    for metrics in sorted((a / "metrics").glob("*.json")):
        assert (b / "metrics" / metrics.name).read_bytes() == metrics.read_bytes(), metrics.name

    # The same experiment started on a third machine, as a Slurm task that is rerun does
    # (README): `--pull` fetches the run cache A pushed, and every stage that computes
    # something is restored from it.
    c = machines.clone("c_exp")
    run(c, ["git", "checkout", "-q", "--detach", "HEAD"])  # a task at a fixed commit
    remote.configure(c)
    again = timed(machines, "C: dvc exp run --pull -S seed=1 (run cache)", c,
                  ["dvc", "exp", "run", "--pull", "-S", "seed=1", "-n", "seed1-on-c"], env)
    # check_params alone runs: it only validates params.yaml, and DVC's run cache keeps no
    # stage with a persistent output (it must stay in place when a bad value stops it)
    assert RUNNING.findall(again) == ["check_params"], again
    restored = [stage for stage in machines.stages if stage != "check_params"]
    assert sorted(FROM_RUN_CACHE.findall(again)) == sorted(restored), again
    assert experiments_shown(c)["seed1-on-c"]["metrics"] == on_a["metrics"]
