"""The fork server the tests start entry points from (tests/forkserver.py) makes the process
``python -m`` makes: the same arguments, folder, environment, ``sys.path``, output and exit status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import entry_command

PROBE = r'''
import json, os, signal, sys
report = {"name": __name__, "argv": sys.argv[1:], "cwd": os.getcwd(), "path0": sys.path[0],
          "probe_env": os.environ.get("PROBE_ENV"), "main_spec": sys.modules["__main__"].__spec__.name,
          "warm": "torch" in sys.modules}
print(json.dumps(report), flush=True)
print("to stderr", file=sys.stderr)
how = sys.argv[1]
if how == "exit":
    sys.exit(int(sys.argv[2]))
if how == "signal":
    os.kill(os.getpid(), signal.SIGTERM)
    signal.pause()
if how == "raise":
    raise ValueError("boom")
if how == "message":
    sys.exit("a message")
if how == "interrupt":
    raise KeyboardInterrupt
if how == "end":  # what the interpreter's end still does: threads joined, atexit, buffered output
    import atexit, threading, time
    atexit.register(print, "atexit ran")
    print("buffered, not flushed")  # before the thread starts: the order holds on a busy machine
    threading.Thread(target=lambda: (time.sleep(0.5), print("thread ended"))).start()
'''


def both_ways(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    (tmp_path / "probe.py").write_text(PROBE)
    env = {**os.environ, "PROBE_ENV": "from the test"}
    run = [subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
           for cmd in ([*entry_command("probe"), *args], [sys.executable, "-m", "probe", *args])]
    return run[0], run[1]


@pytest.fixture
def server_ready(fork_server):
    if fork_server is None:
        pytest.skip("HYMTL_TEST_FORKSERVER=0")
    deadline = time.monotonic() + 300  # its imports, on a slow machine
    while not os.path.exists(fork_server):
        assert time.monotonic() < deadline, "the fork server never listened"
        time.sleep(0.2)


@pytest.mark.parametrize("args, code", [(["exit", "0"], 0), (["exit", "3"], 3), (["signal"], -signal.SIGTERM)])
def test_a_forked_run_is_the_run_python_m_makes(server_ready, tmp_path, args, code):
    forked, fresh = both_ways(tmp_path, *args)
    assert forked.returncode == fresh.returncode == code, (forked.stderr, fresh.stderr)
    mine, theirs = json.loads(forked.stdout), json.loads(fresh.stdout)
    assert mine.pop("warm") and not theirs.pop("warm")  # the first came from the warm interpreter
    assert mine == theirs == {"name": "__main__", "argv": args, "cwd": str(tmp_path), "path0": str(tmp_path),
                              "probe_env": "from the test", "main_spec": "probe"}
    assert forked.stderr == fresh.stderr == "to stderr\n"


def test_an_exception_ends_a_forked_run_as_it_ends_python_m(server_ready, tmp_path):
    forked, fresh = both_ways(tmp_path, "raise")
    assert forked.returncode == fresh.returncode == 1
    for result in (forked, fresh):
        assert result.stderr.startswith("to stderr\nTraceback") and result.stderr.endswith("ValueError: boom\n")


@pytest.mark.parametrize("how, code, stderr_end", [
    ("message", 1, "to stderr\na message\n"),
    ("interrupt", -signal.SIGINT, "KeyboardInterrupt\n"),
    ("end", 0, "to stderr\n"),
])
def test_a_forked_run_ends_as_python_m_ends(server_ready, tmp_path, how, code, stderr_end):
    """The child leaves by ``os._exit`` after what the interpreter's end does that a run can see:
    its SystemExit message, SIGINT for an uncaught KeyboardInterrupt, its threads joined, its
    atexit handlers run and its buffered output flushed, in that order."""
    forked, fresh = both_ways(tmp_path, how)
    assert forked.returncode == fresh.returncode == code, (forked.stderr, fresh.stderr)
    after_report = [result.stdout.splitlines()[1:] for result in (forked, fresh)]  # the report says "warm"
    assert after_report[0] == after_report[1] == (["buffered, not flushed", "thread ended", "atexit ran"]
                                                 if how == "end" else [])
    for result in (forked, fresh):
        assert result.stderr.endswith(stderr_end), result.stderr


def test_a_launcher_killed_by_its_timeout_takes_its_run_along(server_ready, tmp_path):
    (tmp_path / "probe.py").write_text("import os, time\nprint(os.getpid(), flush=True)\ntime.sleep(600)\n")
    launcher = subprocess.Popen([*entry_command("probe")], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    pid = int(launcher.stdout.readline())
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 60
    while alive(pid):
        assert time.monotonic() < deadline, "the run outlived its launcher"
        time.sleep(0.1)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
