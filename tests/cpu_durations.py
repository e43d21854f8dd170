"""A pytest plugin: the CPU seconds each test cost, its subprocesses included (``--cpu-durations=N``).

``--durations`` reports wall time, which on a shared or busy machine says more about the other
users than about the test. The CPU time a test spends (user + system, of the pytest process and
of every child process it started and waited for: the entry points run as subprocesses, their
DataLoader workers, DDP ranks, servers) depends far less on the load, so two measurements on a
busy machine can be compared; not perfectly: under oversubscription torch's threads spin and the
same test was seen to cost up to twice the CPU seconds, so compare runs made side by side. Only
processes that were waited for count: a DDP rank or a server's worker that its parent did not
reap is missed. The runs the worker's fork server (tests/forkserver.py) forked count too: it
reports the CPU seconds of the children it reaped (its own start-up, the imports it saves the
runs, is counted nowhere). Under pytest-xdist each worker measures its own tests. Setup, call and teardown
are counted together: a shared fixture's cost lands on the first test that asks for it (as with
``--durations``), a module fixture's teardown (a server stopped) on the module's last test.

``--cpu-durations=N``: the N most expensive tests at the end (0: all); ``--cpu-durations-json=PATH``:
every test's ``{"cpu_s", "wall_s", "started", "worker"}`` written to PATH. A measuring tool, not an assertion.
"""

from __future__ import annotations

import json
import os
import resource
import time

import pytest

_RESULTS: dict[str, dict[str, float]] = {}


def _cpu_seconds() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime + _fork_server_seconds()


def _fork_server_seconds() -> float:
    """The CPU seconds of the runs this worker's fork server (tests/forkserver.py) forked and
    reaped: its children, not this process's."""
    path = os.environ.get("HYMTL_TEST_FORKSERVER", "")
    try:
        with open(path + ".cpu", encoding="ascii") as f:
            return float(f.read())
    except (OSError, ValueError):
        return 0.0


def pytest_addoption(parser):
    group = parser.getgroup("cpu durations")
    group.addoption("--cpu-durations", type=int, default=None, metavar="N",
                    help="show the N tests that cost the most CPU seconds, subprocesses included (0: all)")
    group.addoption("--cpu-durations-json", default=None, metavar="PATH",
                    help="write every test's CPU and wall seconds to PATH (JSON)")


def _enabled(config) -> bool:
    return config.getoption("--cpu-durations") is not None or config.getoption("--cpu-durations-json") is not None


_START = pytest.StashKey[tuple]()
_PROPERTY = "cpu_durations"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    if _enabled(item.config):
        item.stash[_START] = (_cpu_seconds(), time.perf_counter(), time.time())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when == "teardown" and _START in item.stash:  # the test's last report: setup to teardown
        cpu, wall, started = item.stash[_START]
        # when and where it ran (the epoch time, the xdist worker): the json gives the run's timeline
        outcome.get_result().user_properties.append(
            (_PROPERTY, {"cpu_s": round(_cpu_seconds() - cpu, 2), "wall_s": round(time.perf_counter() - wall, 2),
                         "started": round(started, 2), "worker": os.environ.get("PYTEST_XDIST_WORKER", "main")}))


def pytest_runtest_logreport(report):
    # runs where the reports arrive: in the one process, or in pytest-xdist's controller (the
    # numbers travel from the worker that measured them as the report's user_properties)
    for name, value in report.user_properties:
        if name == _PROPERTY:
            _RESULTS[report.nodeid] = value


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _enabled(config):
        return
    path = config.getoption("--cpu-durations-json")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(_RESULTS, f, indent=1)
    count = config.getoption("--cpu-durations")
    if count is None:
        return
    ranked = sorted(_RESULTS.items(), key=lambda kv: kv[1]["cpu_s"], reverse=True)
    shown = ranked if count == 0 else ranked[:count]
    terminalreporter.write_sep("=", f"{'all' if count == 0 else count} most CPU-expensive tests (subprocesses included)")
    for nodeid, r in shown:
        terminalreporter.write_line(f"{r['cpu_s']:9.2f}s cpu {r['wall_s']:9.2f}s wall  {nodeid}")
    total_cpu = sum(r["cpu_s"] for r in _RESULTS.values())
    total_wall = sum(r["wall_s"] for r in _RESULTS.values())
    terminalreporter.write_line(f"{total_cpu:9.2f}s cpu {total_wall:9.2f}s wall  all {len(_RESULTS)} tests")
