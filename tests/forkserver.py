"""A warm interpreter for the entry points the tests start (``python -m hymtl.<entry> …``).

Every start of an entry point imports torch, Lightning, torchvision, timm and Hydra: about 6 s of
CPU on a 2-core machine, more than the work of most tests that start one, and the suite starts
entry points hundreds of times. So each pytest worker starts this server once (a session fixture
of ``tests/conftest.py``). It imports those libraries (never ``hymtl``: its modules are the code
under test and are imported fresh by every run) and then forks one child per run.

The child is a real process: the test's arguments, working directory, environment and standard
streams; ``sys.path`` as ``python -m`` builds it (the working directory, ``PYTHONPATH``, the
interpreter's own); the entry point run by :func:`runpy.run_module` as ``__main__``, as ``-m``
runs it; and the interpreter's own end (a ``SystemExit``'s code, a traceback and exit 1 for an
exception, atexit handlers, flushed streams). Tests reach it through ``tests/launch_entry.py``,
a launcher that starts no torch: it hands its streams to the server, forwards signals, and exits
with the child's status; it runs ``python -m`` itself when no server answers, so every test also
passes without one (``HYMTL_TEST_FORKSERVER=0``).

What a fork does not reproduce: the one-time warnings of those imports (the server printed them
into its log), a fresh interpreter's random hash seed, and the last step of its end: after the
run's threads, atexit handlers and flushed streams, the child leaves with ``os._exit`` (as
multiprocessing's forked children do), not through the interpreter's teardown of every module and
object. In a fork that teardown writes to nearly every page inherited from the server (reference
counts: a copy-on-write fault per page) and cost ~1.4 s of CPU per run, four times the work of a
refused run itself; nothing a run writes or prints comes after it. Tests that signal the process they
started (SIGKILL mid-run, SIGTERM) start a real interpreter, so that the process they signal is
the one that trains.

    python tests/forkserver.py SOCKET
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import random
import runpy
import select
import signal
import socket
import struct
import sys
import threading
import weakref

#: what an entry point imports before it does anything (~6.5 s of CPU together)
PRELOAD = ("torch", "torchvision", "torchvision.transforms.v2", "lightning.pytorch", "torchmetrics",
           "hydra", "hydra.utils", "omegaconf", "numpy", "PIL.Image", "safetensors.torch", "timm")
#: not preloaded, also when a preloaded library would import them: timm imports wandb if it is
#: installed (for its own summary helpers, which hymtl does not use), and wandb makes temporary
#: folders at import that its runs write media into: one copy per run, as without the server
NOT_PRELOADED = ("wandb",)
SERVER_THREADS = os.environ.get("OMP_NUM_THREADS")  # what torch's thread pool was sized by
HEADER = struct.Struct("!Q")  # the request's length; the launcher's stdin, stdout, stderr ride with it


def python_path(environ) -> list[str]:
    return [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]


def receive_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the launcher hung up mid-request")
        data += chunk
    return data


def receive_request(conn: socket.socket) -> tuple[dict, list[int]]:
    header, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
    header += receive_exactly(conn, HEADER.size - len(header))
    return json.loads(receive_exactly(conn, HEADER.unpack(header)[0])), fds


def exit_status(stop: SystemExit) -> int:
    """The status ``python`` ends with for an uncaught ``SystemExit`` (a message: printed, 1)."""
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=sys.stderr)
    return 1


def end_like_python(status: int, interrupted: bool = False) -> None:
    """What a fresh interpreter does at its end that a run can observe: wait for its non-daemon
    threads, run the atexit handlers (logging's, multiprocessing's, Lightning's), flush the
    standard streams; an uncaught KeyboardInterrupt ends by SIGINT. Then ``os._exit``: no teardown
    of the modules and objects inherited from the server (see the module's docstring)."""
    threading._shutdown()  # what Py_FinalizeEx calls first
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(status)


def run_child(request: dict, fds: list[int], interpreter_path: list[str]) -> None:
    """In the forked child: become ``python -m <module> <args>`` as the launcher was started, run
    it, and end as ``python -m`` ends (the exit status, a traceback for an uncaught exception).
    Never returns."""
    try:
        start_run(request, fds, interpreter_path)
    except SystemExit as stop:
        end_like_python(exit_status(stop))
    except BaseException as error:  # noqa: BLE001 - the interpreter's own last handler
        sys.excepthook(type(error), error, error.__traceback__)
        end_like_python(1, interrupted=isinstance(error, KeyboardInterrupt))
    end_like_python(0)


def start_run(request: dict, fds: list[int], interpreter_path: list[str]) -> None:
    """Become ``python -m <module> <args>`` as the launcher was started, and run it."""
    os.setpgid(0, 0)  # its own group: the server ends the whole run (DataLoader workers, ranks) at once
    # what the server's imports made and clean up when it exits (a temporary folder's finalizer)
    # stays the server's: a run that removed it at its own exit would take it from the next runs
    for finalizer in list(weakref.finalize._registry):
        finalizer.atexit = False
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in fds:
        if fd > 2:
            os.close(fd)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[:] = [os.getcwd(), *python_path(os.environ), *interpreter_path]
    if "torch" in sys.modules and os.environ.get("OMP_NUM_THREADS") != SERVER_THREADS:  # read at torch's import
        threads = os.environ.get("OMP_NUM_THREADS", "")
        sys.modules["torch"].set_num_threads(int(threads) if threads.isdigit() and int(threads) > 0
                                             else len(os.sched_getaffinity(0)))
    sys.argv = [request["module"], *request["args"]]  # run_module sets argv[0] to the module's file
    random.seed()  # as a fresh interpreter's
    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)


class Server:
    """One listening socket; a forked child per request; each child's exit status (and CPU
    seconds, for ``tests/cpu_durations.py``) sent back to its launcher."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.interpreter_path = [p for p in sys.path[1:] if p not in python_path(os.environ)]
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.children: dict[int, socket.socket] = {}  # pid -> its launcher's connection
        self.watched: dict[socket.socket, int] = {}  # connections whose hang-up ends the run
        self.cpu_seconds = 0.0

    def serve(self) -> None:
        self.listener.bind(self.path + ".tmp")
        self.listener.listen(64)
        os.replace(self.path + ".tmp", self.path)  # the socket appears when it accepts
        while True:
            ready, _, _ = select.select([self.listener, *self.watched], [], [], 0.05)
            for conn in ready:
                if conn is self.listener:
                    self.start(self.listener.accept()[0])
                else:  # the launcher is gone (killed, timed out): its run must not outlive it
                    self.end(self.watched.pop(conn))
            self.reap()

    def start(self, conn: socket.socket) -> None:
        try:
            request, fds = receive_request(conn)
        except (ConnectionError, ValueError, OSError):
            conn.close()
            return
        pid = os.fork()
        if pid == 0:
            self.listener.close()
            for other in self.children.values():
                other.close()
            conn.close()
            run_child(request, fds, self.interpreter_path)
        for fd in fds:
            os.close(fd)
        self.children[pid] = conn
        self.watched[conn] = pid
        try:
            conn.sendall(f"{pid}\n".encode())
        except OSError:
            self.end(self.watched.pop(conn))

    def end(self, pid: int) -> None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def reap(self) -> None:
        while self.children:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.cpu_seconds += usage.ru_utime + usage.ru_stime
            with open(self.path + ".cpu.tmp", "w") as f:
                f.write(f"{self.cpu_seconds:.3f}\n")
            os.replace(self.path + ".cpu.tmp", self.path + ".cpu")
            conn = self.children.pop(pid, None)
            if conn is None:
                continue
            self.watched.pop(conn, None)
            try:
                conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
            except OSError:
                pass
            conn.close()


def main(path: str) -> None:
    for name in NOT_PRELOADED:
        sys.modules[name] = None  # an ImportError for the preload's optional imports
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    for name in NOT_PRELOADED:
        del sys.modules[name]  # each run imports it itself, when it needs it
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the fixture's teardown: the imports' cleanup runs
    Server(path).serve()


if __name__ == "__main__":
    main(sys.argv[1])
