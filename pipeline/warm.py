"""Warm interpreters for the stages: a fork server that has imported torch and MLflow once.

DVC runs every stage in a new Python process, and at the default's budgets most of a
stage's CPU goes to imports: ``import torch`` (about 1.2 s), ``torch._dynamo`` (1.2 s
more; ``torch.optim`` imports it on the first ``step``) and, in the stage's tracking
process, ``import mlflow`` (about 1.5 s). Under DVC, a stage (and its tracking process)
instead hands itself to a *warm* process that did those imports once and forks a copy of
itself per stage, as PyTorch's DataLoader workers are forked from a process that has
imported torch:

- The stage's process (the *client*) connects to the server's Unix socket and sends its
  module, arguments, working directory, environment, ``sys.path`` and umask, with its
  standard input, output and error (the file descriptors themselves, ``SCM_RIGHTS``).
- The server forks. The copy takes all of these over, forgets the project's own modules
  (``pipeline``, ``stages``: only third-party libraries are preloaded, so edited code and
  other checkouts are read afresh) and runs the module as ``__main__``.
- The client waits and exits as the copy did (its status, or the signal that ended it). It
  forwards the signals that DVC or a user send it (Ctrl-C, ``kill``), and if it is killed
  (SIGKILL) the copy kills itself, so that the stage dies with its process as before.

Nothing is shared between stages but the imported libraries: each stage is a fresh fork
of the same state. What could differ from a new interpreter is keyed: one server per
Python executable, installed packages (the ``site-packages`` folder's time stamp), this
file's code, interpreter flags, and the environment variables that libraries read when
imported (threads: ``OMP_NUM_THREADS``, ``MKL_*``, ``OPENBLAS_*``; ``TORCH*``,
``CUDA_*``, MLflow's logging set-up, the locale, ``PYTHON*``...). The rest (the tracking
URI, MLflow's client settings, DVC's variables) a copy reads from its client's
environment. CUDA is never initialised in the server, so a copy may use the GPU.

The first stage of a run starts the server in the background and runs the ordinary way;
the next ones use it. The server exits after :data:`IDLE_SECONDS` without a stage. Any
failure to reach it means an ordinary run, never a failed stage. Linux only (``fork``,
``SCM_RIGHTS``); ``CONFIDNET_WARM=off`` turns it off, and it is off outside DVC
(``DVC_STAGE`` unset) and under torchrun.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import io
import json
import os
import selectors
import signal
import socket
import stat
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any, NoReturn

from pipeline.runtime import switch_on

ENV = "CONFIDNET_WARM"
IDLE_SECONDS = 120.0
# What the stages and their tracking processes import that takes time; each is optional.
PRELOAD = ("numpy", "scipy.special", "yaml", "torch", "torch.optim", "torch._dynamo",
           "torchvision", "faiss", "mlflow", "mlflow.store.tracking.sqlalchemy_store")
# Environment read at import time by the interpreter or the preloaded libraries: a server
# serves only clients that agree with it on these.
KEYED_PREFIXES = ("OMP_", "MKL_", "OPENBLAS_", "GOTO_", "KMP_", "TORCH", "PYTORCH_", "CUDA_",
                  "NVIDIA_", "PYTHON", "LC_", "LANG", "TMPDIR", "HOME", "TQDM_",
                  "SQLALCHEMY_", "MLFLOW_CONFIGURE_LOGGING", "MLFLOW_LOGGING_LEVEL")
# Not keyed: a copy takes its client's sys.path, and the tracking process puts its
# project's root on PYTHONPATH (one server for every checkout).
UNKEYED = (ENV, "PYTHONPATH")
_CHILD = "_CONFIDNET_WARM_CHILD"  # set (to its pid) in a copy's environment
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT,
              signal.SIGUSR1, signal.SIGUSR2)
_HEADER = struct.Struct("!I")
_STATUS = struct.Struct("!i")


def enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process may hand itself to a warm interpreter: under DVC, not under
    torchrun, not already a warm copy, ``CONFIDNET_WARM`` on, on Linux. A bad
    ``CONFIDNET_WARM`` means an ordinary run, in which the stage reports it
    (:func:`check_setting`, from :func:`pipeline.stage.run_stage`)."""
    try:
        wanted = switch_on(ENV, environ)
    except ValueError:
        return False
    return (wanted and "DVC_STAGE" in environ and "RANK" not in environ
            and environ.get(_CHILD) != str(os.getpid()) and sys.platform == "linux"
            and hasattr(socket, "send_fds"))


def check_setting(environ: Mapping[str, str] = os.environ) -> None:
    """Raise ValueError naming a bad ``CONFIDNET_WARM`` and the valid values."""
    switch_on(ENV, environ)


def server_key(environ: Mapping[str, str] = os.environ) -> str:
    """What a server and its clients must agree on (see the module docstring)."""
    site = sysconfig.get_paths()["purelib"]
    with contextlib.suppress(OSError):
        site = f"{site}@{Path(site).stat().st_mtime_ns}"
    keyed = sorted((k, v) for k, v in environ.items() if k.startswith(KEYED_PREFIXES)
                   and k not in UNKEYED)
    facts = [sys.executable, sys.version, repr(sys.flags), sys.warnoptions, site,
             hashlib.sha256(Path(__file__).read_bytes()).hexdigest(), keyed]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:20]


def socket_path(environ: Mapping[str, str] = os.environ,
                folder: Path | None = None) -> Path:
    """The server's socket, in this user's folder ``confidnet-warm-<uid>`` of ``folder``
    (the temporary folder by default)."""
    folder = Path(tempfile.gettempdir()) if folder is None else folder
    return folder / f"confidnet-warm-{os.getuid()}" / server_key(environ)


def private_folder(path: Path) -> bool:
    """Make the socket's folder, readable by this user only, and check that it is: a
    socket anyone could replace would receive the stage's environment and streams."""
    with contextlib.suppress(FileExistsError, OSError):
        path.parent.mkdir(mode=0o700)
    try:
        found = path.parent.lstat()
    except OSError:
        return False
    return (stat.S_ISDIR(found.st_mode) and found.st_uid == os.getuid()
            and not found.st_mode & 0o077)


# ----------------------------------------------------------------------------- the client

def run_in_warm_interpreter() -> None:
    """Called first by a stage's (or tracking process's) module, before its imports. Under
    DVC (see :func:`enabled`): run this program in a warm copy and exit as it did, or,
    where there is no server yet, start one in the background and return (an ordinary
    run). Elsewhere it returns at once."""
    if not enabled():
        return
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is None or not spec.name:  # only `python -m <module>` is handed over
        return
    try:  # the three standard streams are what a copy takes over
        for fd in (0, 1, 2):
            os.fstat(fd)
    except OSError:
        return
    path = socket_path()
    if not private_folder(path):
        return
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        _start_server(path)
        return
    umask = os.umask(0)
    os.umask(umask)
    try:  # OSError: no working directory to hand over, or the server went away (its idle
        # exit, a failed fork): nothing was started, an ordinary run
        request = json.dumps({"module": spec.name, "argv": sys.argv[1:],
                              "cwd": str(Path.cwd()), "env": dict(os.environ),
                              "path": sys.path, "umask": umask}).encode()
        socket.send_fds(conn, [_HEADER.pack(len(request))], [0, 1, 2])
        conn.sendall(request)
        pid = _STATUS.unpack(_read_exactly(conn, _STATUS.size))[0]
    except OSError:
        conn.close()
        return
    _wait_for_copy(conn, pid)


def _wait_for_copy(conn: socket.socket, pid: int) -> NoReturn:
    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for signum in _FORWARDED:
        signal.signal(signum, forward)
    try:
        status = _STATUS.unpack(_read_exactly(conn, _STATUS.size))[0]
    except OSError:  # no status: the copy ended by a signal and its server is gone too
        while Path(f"/proc/{pid}").exists():
            time.sleep(0.2)
        sys.stderr.write(f"error: the warm interpreter that ran this program (pid {pid}) "
                         f"ended without an exit status (by a signal, and its server is "
                         f"gone); {ENV}=off runs it the ordinary way\n")
        os._exit(1)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:  # killed by a signal: the same end for this process
        for signum in _FORWARDED:
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        time.sleep(1)
        os._exit(128 - code)
    os._exit(code)


def _read_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _start_server(path: Path) -> None:
    """Start the server in the background, in its own session (so that neither Ctrl-C
    nor a test killing the stage's process group reaches it), holding no stream of the
    stage's: whoever reads the stage's output to its end does not wait for the server."""
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.pop("DVC_STAGE", None)
    with contextlib.suppress(OSError), Path(f"{path}.log").open("ab") as log:
        subprocess.Popen([sys.executable, "-m", "pipeline.warm", str(path)], cwd="/",
                         env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=log, start_new_session=True, close_fds=True)


# ----------------------------------------------------------------------------- the server

def serve(path: Path, idle_seconds: float = IDLE_SECONDS,
          preload: tuple[str, ...] = PRELOAD) -> None:
    """``python -m pipeline.warm <socket>``: import ``preload``, then fork a copy per
    request until ``idle_seconds`` pass without one. One server per socket: a second
    exits at once."""
    if not private_folder(path):
        return
    lock = Path(f"{path}.lock").open("w")  # noqa: SIM115  held for the server's life
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return
    for name in preload:
        with contextlib.suppress(ImportError):
            __import__(name)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(64)
    bound = path.stat().st_ino
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGTERM, _stop_serving)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    copies: dict[int, socket.socket] = {}
    try:
        _serve_until_idle(listener, lock, selector, copies, (wake_read, wake_write),
                          idle_seconds)
    except SystemExit:  # SIGTERM: the copies go on, and report their ends themselves
        pass
    finally:
        with contextlib.suppress(OSError):
            if path.stat().st_ino == bound:
                path.unlink()
        listener.close()


def _stop_serving(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def _serve_until_idle(listener: socket.socket, lock: IO[str],
                      selector: selectors.BaseSelector, copies: dict[int, socket.socket],
                      wakeup: tuple[int, int], idle_seconds: float) -> None:
    """Fork a copy per connection, report each copy's end (its wait status) to its
    client, until ``idle_seconds`` pass with no copy running. A copy closes what the
    server holds: above all the lock, which must not outlive the server."""
    last = time.monotonic()
    while copies or time.monotonic() - last < idle_seconds:
        for key, _ in selector.select(timeout=min(idle_seconds, 5.0)):
            if key.fd == listener.fileno():
                conn, _ = listener.accept()
                pid = _fork_copy(conn, closing=[listener, lock, *copies.values()],
                                 wakeup=wakeup, selector=selector)
                if pid:
                    copies[pid] = conn
            else:
                with contextlib.suppress(BlockingIOError):
                    os.read(wakeup[0], 4096)
        while copies:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid in copies:
                conn = copies.pop(pid)
                with contextlib.suppress(OSError):
                    conn.sendall(_STATUS.pack(status))
                conn.close()
        if copies:
            last = time.monotonic()


def _fork_copy(conn: socket.socket, closing: list[Any], wakeup: tuple[int, int],
               selector: selectors.BaseSelector) -> int:
    """Read one request and fork its copy; returns the copy's pid (0 when the request was
    unreadable: the client then runs the ordinary way)."""
    fds: list[int] = []
    try:
        conn.settimeout(10)
        header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
        if len(header) != _HEADER.size or len(fds) != 3:
            raise ConnectionError("bad request")
        request = json.loads(_read_exactly(conn, _HEADER.unpack(header)[0]))
        conn.settimeout(None)
    except (OSError, ValueError):
        for fd in fds:
            os.close(fd)
        conn.close()
        return 0
    _flush()  # nothing buffered in the server is written twice
    try:
        pid = os.fork()
    except OSError:  # out of processes or memory: the client runs the ordinary way
        for fd in fds:
            os.close(fd)
        conn.close()
        return 0
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the server's is to stop serving
        selector.close()
        for item in closing:
            item.close()
        signal.set_wakeup_fd(-1)
        for fd in wakeup:
            os.close(fd)
        _become(conn, request, fds)
    for fd in fds:
        os.close(fd)
    with contextlib.suppress(OSError):  # the client is gone: so goes its copy
        conn.sendall(_STATUS.pack(pid))
    return pid


def _become(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> NoReturn:
    """In the forked copy: take over the client's process state and run its module."""
    ended = [1]  # the exit status, reported by the copy itself (see report)

    def report() -> None:
        """The last exit function (the first registered): the status goes to the client
        from here, so that it arrives even if the server is gone; the server reports an
        end by a signal."""
        _flush()
        with contextlib.suppress(OSError):
            conn.sendall(_STATUS.pack(ended[0] << 8))

    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setsid()
        for target, fd in enumerate(fds):
            if fd != target:
                os.dup2(fd, target)
                os.close(fd)
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[_CHILD] = str(os.getpid())
        sys.path[:] = request["path"]
        sys.argv = ["-m", *request["argv"]]
        # The same stream objects (loggers set up at import hold them), now on the
        # client's descriptors, buffered as a new interpreter's would be.
        unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
        for stream, line_buffering in ((sys.stdout, os.isatty(1)), (sys.stderr, True)):
            if isinstance(stream, io.TextIOWrapper):
                stream.reconfigure(line_buffering=line_buffering, write_through=unbuffered)
        _reseed()
        for name in [m for m in sys.modules if m.split(".")[0] in ("pipeline", "stages")]:
            del sys.modules[name]

        def orphaned() -> None:  # the client was killed: so is this copy
            with contextlib.suppress(OSError):
                while conn.recv(4096):
                    pass
            os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=orphaned, daemon=True).start()
        atexit.register(report)
        ended[0] = 0  # pipeline.stage.end_process exits 0 through the exit functions
        import runpy

        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as stop:
        if stop.code is None:
            ended[0] = 0
        elif isinstance(stop.code, int):
            ended[0] = stop.code & 0xFF
        else:
            sys.stderr.write(f"{stop.code}\n")
            ended[0] = 1
    except KeyboardInterrupt:  # as Python does: report it, exit functions, end by SIGINT
        traceback.print_exc()
        atexit.unregister(report)
        atexit._run_exitfuncs()
        _flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001  the interpreter's own report of it
        traceback.print_exc()
        ended[0] = 1
    atexit._run_exitfuncs()
    _flush()
    os._exit(ended[0])


def _reseed() -> None:
    """Fresh entropy for the generators that a new interpreter seeds from the OS
    (Python's, numpy's and torch's default ones): every copy would otherwise start from
    the server's state. The stages seed their own (``params.yaml``'s ``seed``)."""
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    if "torch" in sys.modules:
        sys.modules["torch"].seed()


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


if __name__ == "__main__":
    serve(Path(sys.argv[1]))
