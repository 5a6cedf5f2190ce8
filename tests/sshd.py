"""A throwaway OpenSSH server for the scale-out tests: the real ``sshd`` (Debian's
openssh-server) on 127.0.0.1 at a free port, with a host key and one client key made for
it in a temporary directory, running as the current user, so a DVC SSH remote can be
tested against the server a lab would use, without root and without touching ``~/.ssh``
or the machine's own sshd."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

# sshd lives in sbin, often not on a normal user's PATH.
SEARCH_PATH = os.pathsep.join(["/usr/sbin", "/usr/local/sbin", os.environ.get("PATH", "")])
INSTALL_HINT = ("install OpenSSH's server (Debian/Ubuntu: `apt-get install openssh-server`, "
                "as .ci/run does), or deselect these tests with -m 'not scaleout'")
# Where a root sshd drops privileges before authentication; Debian's init script makes it
# at boot, which a container never does. Compiled in, so no config option moves it.
PRIVSEP_DIR = Path("/run/sshd")


@dataclass(frozen=True)
class SSHServer:
    """How to reach the server: what a DVC SSH remote needs, and nothing from ``~/.ssh``."""

    host: str
    port: int
    user: str
    keyfile: Path  # private key the server accepts
    pid: int


def find_sshd() -> str | None:
    return shutil.which("sshd", path=SEARCH_PATH)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                    "-f", str(path)], check=True, capture_output=True)


def _banner(port: int) -> bytes:
    """The first bytes the server sends, or b'' when nothing answers yet."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            return sock.recv(64)
    except OSError:
        return b""


def _children(pid: int) -> list[int]:
    """Processes whose parent is ``pid``: sshd's per-connection processes, which call
    setsid() and so leave its process group."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces, so split after the ')'
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _descendants(pid: int) -> list[int]:
    out = []
    for child in _children(pid):
        out += [child, *_descendants(child)]
    return out


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM sshd and every process it started (children first), then wait: no process
    of ours outlives the tests."""
    for pid in [*reversed(_descendants(proc.pid)), proc.pid]:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def running_sshd(workdir: Path, timeout_s: float = 20) -> Iterator[SSHServer]:
    """Start ``sshd -D -e`` with a config, host key, client key and authorized_keys in
    ``workdir``; yield how to log in; stop it (and its sessions) on exit."""
    sshd = find_sshd()
    if sshd is None:
        raise RuntimeError(f"no sshd on {SEARCH_PATH}: {INSTALL_HINT}")
    if shutil.which("ssh-keygen") is None:
        raise RuntimeError(f"no ssh-keygen on PATH: {INSTALL_HINT}")
    workdir.mkdir(parents=True, exist_ok=True)
    host_key, client_key = workdir / "host_ed25519", workdir / "client_ed25519"
    _keygen(host_key, "throwaway host key")
    _keygen(client_key, "throwaway client key")
    authorized = workdir / "authorized_keys"
    shutil.copy(client_key.with_suffix(".pub"), authorized)
    port = _free_port()
    config = workdir / "sshd_config"
    config.write_text("\n".join([
        "ListenAddress 127.0.0.1",
        f"Port {port}",
        f"HostKey {host_key}",
        f"PidFile {workdir / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        # No PAM: no system login stack to configure; works as a normal user.
        "UsePAM no",
        # The keys live in a temporary directory whose modes sshd would otherwise refuse.
        "StrictModes no",
        "PermitRootLogin prohibit-password",  # CI runs as root: key login only
        # SFTP inside sshd (what DVC's SSH remote speaks): no sftp-server path to find.
        "Subsystem sftp internal-sftp",
        "LogLevel VERBOSE",
        "",
    ]))
    made_privsep = False
    if os.geteuid() == 0 and not PRIVSEP_DIR.exists():
        PRIVSEP_DIR.mkdir(mode=0o755)
        made_privsep = True
    log = workdir / "sshd.log"
    with log.open("wb") as log_file:
        # -D: stay in the foreground as our child; -e: log to stderr (our log file).
        proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while not _banner(port).startswith(b"SSH-2.0-"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start on 127.0.0.1:{port} "
                                   f"(exit status {proc.poll()}):\n{log.read_text()}")
            time.sleep(0.1)
        yield SSHServer(host="127.0.0.1", port=port, user=getpass.getuser(),
                        keyfile=client_key, pid=proc.pid)
    finally:
        _stop(proc)
        if made_privsep:
            with suppress(OSError):  # another sshd started meanwhile and uses it
                PRIVSEP_DIR.rmdir()
