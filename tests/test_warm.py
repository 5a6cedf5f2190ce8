"""pipeline.warm: a real server (started by a first client, as under DVC), real clients
(``python -m <module>`` in their own interpreters), real signals. The probe module reports
what its process sees; the tests share one server (their own TMPDIR keys it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.warm import ENV, check_setting, enabled, private_folder, socket_path

PROBE = '''
from pipeline.warm import run_in_warm_interpreter

run_in_warm_interpreter()

import json, os, random, sys, time

print(json.dumps({"pid": os.getpid(), "torch_preloaded": "torch" in sys.modules,
                  "random": random.random(),
                  "argv": sys.argv, "cwd": os.getcwd(), "probe": os.environ.get("PROBE"),
                  "stdin": sys.stdin.read() if os.environ.get("PROBE_STDIN") else None,
                  "umask": os.umask(0o22)}), flush=True)
sys.stderr.write("to stderr\\n")
if os.environ.get("PROBE_EXEC"):
    import contextlib, io
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(os.environ["PROBE_EXEC"])
    print(json.dumps({"exec": out.getvalue()}))
if os.environ.get("PROBE_SLEEP"):
    time.sleep(float(os.environ["PROBE_SLEEP"]))
if os.environ.get("PROBE_RAISE"):
    raise RuntimeError("probe failed")
sys.exit(int(os.environ.get("PROBE_EXIT", "0")))
'''


@pytest.fixture(scope="module")
def probe_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder with the probe module, whose TMPDIR (its own server's key and socket
    folder) the probes use; the server is stopped at the end."""
    folder = tmp_path_factory.mktemp("warm")
    (folder / "tmp").mkdir()
    (folder / "warmprobe.py").write_text(PROBE)
    yield folder
    server = f"pipeline.warm {socket_path(probe_env(folder), folder / 'tmp')}"
    for pid in subprocess.run(["pgrep", "-f", server], capture_output=True,
                              text=True).stdout.split():
        os.kill(int(pid), signal.SIGTERM)


def probe_env(folder: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "RANK", "PYTHONPATH")}
    return {**env, "DVC_STAGE": "probe", "TMPDIR": str(folder / "tmp"), **extra}


def start_probe(folder: Path, *args: str, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "warmprobe", *args], cwd=folder,
                            env=probe_env(folder, **extra), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            umask=0o027)


def probe(folder: Path, *args: str, stdin: str = "", **extra: str
          ) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    proc = start_probe(folder, *args, **extra)
    out, err = proc.communicate(stdin, timeout=120)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    seen: dict[str, Any] = {}
    for line in out.splitlines():
        seen.update(json.loads(line))
    return done, seen


@pytest.fixture(scope="module")
def warm(probe_dir: Path) -> Path:
    """The first probe runs the ordinary way and starts the server; wait until it is up."""
    _, seen = probe(probe_dir)
    assert not seen["torch_preloaded"]
    deadline = time.monotonic() + 120
    while not socket_path(probe_env(probe_dir), probe_dir / 'tmp').exists():
        assert time.monotonic() < deadline, "no server"
        time.sleep(0.2)
    return probe_dir


def test_a_copy_runs_the_module_with_the_clients_process_state(warm: Path) -> None:
    proc = start_probe(warm, "--flag", "x y", PROBE="here", PROBE_STDIN="1")
    out, err = proc.communicate("what the stage reads", timeout=120)
    assert proc.returncode == 0, err
    seen = json.loads(out)
    assert seen["torch_preloaded"], "not run in the warm server"
    assert seen["pid"] != proc.pid
    assert seen["argv"] == [str(warm / "warmprobe.py"), "--flag", "x y"]
    assert Path(seen["cwd"]) == warm
    assert seen["probe"] == "here" and seen["stdin"] == "what the stage reads"
    assert err == "to stderr\n"
    assert seen["umask"] == 0o027


def test_each_copy_draws_fresh_entropy_as_a_new_interpreter_would(warm: Path) -> None:
    code = ("import numpy, torch; print(numpy.random.random(), torch.rand(1).item(), "
            "torch.initial_seed())")
    draws = []
    for _ in range(2):
        _, seen = probe(warm, PROBE_EXEC=code)
        assert seen["torch_preloaded"]
        draws.append((seen["random"], seen["exec"]))
    assert draws[0][0] != draws[1][0] and draws[0][1] != draws[1][1], draws


def test_exit_statuses_are_the_clients(warm: Path) -> None:
    done, seen = probe(warm, PROBE_EXIT="3")
    assert seen["torch_preloaded"] and done.returncode == 3
    done, seen = probe(warm, PROBE_RAISE="1")
    assert seen["torch_preloaded"] and done.returncode == 1
    assert "RuntimeError: probe failed" in done.stderr and "Traceback" in done.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_client_reaches_its_copy(warm: Path, signum: int) -> None:
    proc = start_probe(warm, PROBE_SLEEP="60")
    assert proc.stdout is not None
    seen = json.loads(proc.stdout.readline())
    assert seen["torch_preloaded"]
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signum  # the copy ended by it, so did the client
    if signum == signal.SIGINT:  # Ctrl-C: Python's KeyboardInterrupt, in the copy
        assert "KeyboardInterrupt" in err
    assert not Path(f"/proc/{seen['pid']}").exists()


def test_a_killed_client_takes_its_copy_with_it(warm: Path) -> None:
    proc = start_probe(warm, PROBE_SLEEP="60")
    assert proc.stdout is not None
    seen = json.loads(proc.stdout.readline())
    assert seen["torch_preloaded"]
    proc.kill()
    proc.communicate(timeout=30)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{seen['pid']}").exists():  # a zombie until the server reaps it
        status = Path(f"/proc/{seen['pid']}/stat").read_text().split(")")[-1].split()[0]
        if status == "Z":
            break
        assert time.monotonic() < deadline, "the copy outlived its client"
        time.sleep(0.05)


def test_off_outside_dvc_and_when_turned_off(warm: Path) -> None:
    _, seen = probe(warm, **{ENV: "off"})
    assert not seen["torch_preloaded"]
    env = probe_env(warm)
    del env["DVC_STAGE"]
    out = subprocess.run([sys.executable, "-m", "warmprobe"], cwd=warm, env=env,
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert not json.loads(out)["torch_preloaded"]
    assert enabled({"DVC_STAGE": "x"}) and not enabled({"DVC_STAGE": "x", ENV: "off"})
    assert not enabled({"DVC_STAGE": "x", "RANK": "0"})  # torchrun's processes


def test_a_client_with_nothing_to_hand_over_runs_the_ordinary_way(warm: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "warmprobe"], cwd=warm, env=probe_env(warm),
                         capture_output=True, text=True, check=True, timeout=120,
                         preexec_fn=lambda: os.close(0)).stdout  # no standard input
    assert not json.loads(out)["torch_preloaded"]


def test_copies_outlive_a_stopped_server_and_report_their_own_ends(warm: Path) -> None:
    """The last test of the shared server: it stops it."""
    path = socket_path(probe_env(warm), warm / "tmp")
    running = [start_probe(warm, PROBE_SLEEP="2", PROBE_EXIT=str(code)) for code in (5, 0)]
    for proc in running:
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline())["torch_preloaded"]
    # the oldest: the copies are forks of the server, with its command line
    [server] = subprocess.run(["pgrep", "-o", "-f", f"pipeline.warm {path}"],
                              capture_output=True, text=True).stdout.split()
    os.kill(int(server), signal.SIGTERM)
    for proc, code in zip(running, (5, 0), strict=True):
        proc.communicate(timeout=60)
        assert proc.returncode == code
    assert not path.exists()  # the stopped server removed its socket


def test_a_bad_setting_names_the_valid_values() -> None:
    check_setting({ENV: "off"})
    check_setting({})
    with pytest.raises(ValueError,
                       match=r"CONFIDNET_WARM='maybe' is not a valid value; use one of: on, off"):
        check_setting({ENV: "maybe"})


def test_the_server_exits_when_idle(tmp_path: Path) -> None:
    (tmp_path / "private").mkdir(mode=0o700)
    path = tmp_path / "private" / "idle.sock"
    server = subprocess.Popen(
        [sys.executable, "-c", "import sys; from pathlib import Path; "
         "from pipeline.warm import serve; serve(Path(sys.argv[1]), 2.0, ())", str(path)])
    deadline = time.monotonic() + 60
    while not path.exists():  # it listens
        assert server.poll() is None and time.monotonic() < deadline, "it never listened"
        time.sleep(0.05)
    assert server.wait(timeout=60) == 0  # then, with no client, exits
    assert not path.exists()  # and removes its socket


def test_a_socket_folder_others_can_read_is_not_used(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    assert not private_folder(shared / "socket")
    (tmp_path / "mine").mkdir(mode=0o700)
    assert private_folder(tmp_path / "mine" / "socket")
    assert private_folder(tmp_path / "new" / "socket")  # made, readable by its user only
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
