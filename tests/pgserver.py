"""A throwaway PostgreSQL server for the tracking-server tests: Debian's PostgreSQL
(``postgresql`` package, binaries under ``/usr/lib/postgresql/<version>/bin``) in a
temporary data directory, listening on 127.0.0.1 at a free port with its unix socket in
that directory, trust authentication for one throwaway superuser, started as a child of
the tests and removed with its data when they end. Nothing touches the machine's own
clusters (``pg_lsclusters``) or its service.

PostgreSQL refuses to run as root; under root (CI containers) the server runs as the
``postgres`` system user the Debian package creates, and the data directory is made for it
outside pytest's per-user temporary directory (which only root may enter)."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

INSTALL_HINT = ("install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`, as .ci/run "
                "does), or deselect these tests with -m 'not scaleout'")
PG_ROOT = Path("/usr/lib/postgresql")
PROGRAMS = ("initdb", "postgres", "pg_isready", "createdb")
# The system user a root process runs the server as (made by Debian's postgresql-common).
SYSTEM_USER = "postgres"
SUPERUSER = "mlflow"  # the throwaway database superuser (trust authentication)


@dataclass(frozen=True)
class PostgresServer:
    host: str
    port: int
    user: str
    bindir: Path
    pid: int

    def uri(self, database: str) -> str:
        """The SQLAlchemy URL of ``database``, as ``mlflow server --backend-store-uri``
        takes it. The driver is named: a bare ``postgresql://`` means psycopg2 to
        SQLAlchemy 2.0 and psycopg (3) to 2.1."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create database ``name``; returns its URL."""
        subprocess.run([str(self.bindir / "createdb"), "-h", self.host, "-p", str(self.port),
                        "-U", self.user, name], check=True, capture_output=True, text=True,
                       timeout=60)
        return self.uri(name)


def find_bindir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding every program we need, else
    the directory of ``initdb`` on PATH if the others are beside it."""
    candidates = sorted((p / "bin" for p in PG_ROOT.glob("*") if p.name.isdigit()),
                        key=lambda p: int(p.parent.name), reverse=True)
    found = shutil.which("initdb")
    if found:
        candidates.append(Path(found).resolve().parent)
    for bindir in candidates:
        if all(os.access(bindir / name, os.X_OK) for name in PROGRAMS):
            return bindir
    return None


def missing_reason() -> str | None:
    """Why the server cannot start here (for a skip), or None."""
    if find_bindir() is None:
        return f"no PostgreSQL server programs ({', '.join(PROGRAMS)}) under {PG_ROOT}: " \
               f"{INSTALL_HINT}"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            return (f"running as root, and PostgreSQL refuses root, but there is no "
                    f"{SYSTEM_USER!r} user to run it as: {INSTALL_HINT}")
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Fast shutdown (SIGINT: abort sessions, then exit cleanly, backends included), and a
    hard kill if that hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGQUIT)  # immediate shutdown of the postmaster's children
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def running_postgres(timeout_s: float = 60) -> Iterator[PostgresServer]:
    """``initdb`` a temporary cluster and run its ``postgres`` in the foreground as our child;
    yield how to reach it; stop it and delete the cluster on exit."""
    reason = missing_reason()
    if reason:
        raise RuntimeError(reason)
    bindir = find_bindir()
    assert bindir is not None
    as_root = os.geteuid() == 0
    run_as: dict[str, str] = {"user": SYSTEM_USER, "group": SYSTEM_USER} if as_root else {}
    # mkdtemp: mode 0700 in the system temporary directory, which every user may traverse
    workdir = Path(tempfile.mkdtemp(prefix="confidnet-pg-"))
    try:
        if as_root:
            entry = pwd.getpwnam(SYSTEM_USER)
            os.chown(workdir, entry.pw_uid, entry.pw_gid)
        data, log = workdir / "data", workdir / "postgres.log"
        env = {**os.environ, "LC_ALL": "C", "TZ": "UTC"}
        if as_root:
            env["HOME"] = str(workdir)
        subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", SUPERUSER,
                        "--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync"],
                       check=True, capture_output=True, text=True, env=env, timeout=120,
                       cwd=workdir, **run_as)  # type: ignore[call-overload]
        port = _free_port()
        with open(log, "wb") as log_file:
            # -F: no fsync (a throwaway cluster); -k: the unix socket stays in our directory
            # instead of /var/run/postgresql; listen on loopback only.
            proc = subprocess.Popen(
                [str(bindir / "postgres"), "-D", str(data), "-h", "127.0.0.1",
                 "-p", str(port), "-k", str(workdir), "-F"],
                stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                env=env, cwd=workdir, **run_as)  # type: ignore[call-overload]
        try:
            deadline = time.monotonic() + timeout_s
            while subprocess.run([str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1",
                                  "-p", str(port)], check=False).returncode != 0:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"PostgreSQL did not start on 127.0.0.1:{port} "
                                       f"(exit status {proc.poll()}):\n{log.read_text()}")
                time.sleep(0.2)
            yield PostgresServer(host="127.0.0.1", port=port, user=SUPERUSER,
                                 bindir=bindir, pid=proc.pid)
        finally:
            _stop(proc)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
