"""``python -m MODULE ARGS`` for the tests, started by the fork server when one runs.

    python -I -S tests/launch_entry.py MODULE [ARGS...]

With ``HYMTL_TEST_FORKSERVER`` naming the socket of ``tests/forkserver.py``, this launcher (the
standard library only: it starts in milliseconds) hands its working directory, environment,
arguments and its stdin, stdout and stderr to the server, which forks the run from an interpreter
that has already imported torch and Lightning. It forwards the signals a test may send
(SIGTERM, SIGINT, SIGHUP, SIGUSR1/2) and ends with the run's exit status; killed (a test's
timeout), it leaves the server to kill the run. Without a server (the variable unset or ``0``, or
nothing listening), it becomes ``python -m MODULE ARGS`` itself.
"""

import json
import os
import signal
import socket
import struct
import sys

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def connect():
    path = os.environ.get("HYMTL_TEST_FORKSERVER", "")
    if path in ("", "0"):
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        conn.close()
        return None
    return conn


def main():
    module, args = sys.argv[1], sys.argv[2:]
    conn = connect()
    if conn is None:
        os.execv(sys.executable, [sys.executable, "-m", module, *args])
    for fd in (0, 1, 2):  # a closed standard stream is /dev/null, as for any child
        try:
            os.fstat(fd)
        except OSError:
            os.dup2(os.open(os.devnull, os.O_RDWR), fd)
    body = json.dumps({"module": module, "args": args, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
    socket.send_fds(conn, [struct.pack("!Q", len(body))], [0, 1, 2])
    conn.sendall(body)
    replies = conn.makefile("r")
    pid = int(replies.readline())

    def forward(signum, _frame):
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in FORWARDED:
        signal.signal(signum, forward)
    status = replies.readline()
    if not status:
        sys.stderr.write("launch_entry: the fork server ended before the run did\n")
        sys.exit(70)
    code = int(status)
    if code < 0:  # killed by a signal: end the same way, so the test sees the same returncode
        try:
            signal.signal(-code, signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL, SIGSTOP: always their default
            pass
        os.kill(os.getpid(), -code)
    sys.exit(code)


if __name__ == "__main__":
    main()
