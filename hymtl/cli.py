"""What every command-line entry point shares: the config resolvers and one error policy.

Each entry point (``train``, ``eval``, ``predict``, ``export``) is a Hydra main, made by
:func:`hymtl_main`, that hands its task to :func:`run_entry`::

    @hymtl_main("eval")            # conf/eval.yaml; --help: conf/hydra/help/eval.yaml
    def main(cfg):
        return run_entry(evaluate, cfg)

The policy, the same everywhere:

* a config that cannot be composed or does not fit what it configures (an unknown key, group
  option or value: ``logger=csv``, ``data.labels_csv=x``, ``+data.labels_csv=x``,
  ``trainer.precision=garbage``) prints ``error: <one line naming it and the nearest valid
  ones>`` and exits 2 before anything runs, leaving no run folder (:func:`hymtl_main`,
  :func:`hymtl.config.check_targets`);
* a user error (:class:`~hymtl.errors.HymtlError`, also when Hydra's ``instantiate`` wrapped it)
  prints ``error: <one line>`` on stderr and exits 2 (or the error's own ``exit_code``: export's
  failed parity check exits 3);
* Ctrl-C / SIGTERM during a run (``hymtl.signals.RunInterrupted``) prints what was saved and exits
  with the signal's code (130 / 143);
* a DDP rank that died or went silent prints one line and exits 1;
* inside a Hydra multirun, any failure of one job is logged, recorded as ``error.json`` in its run
  folder (``hymtl.summarize`` lists it as failed) and the sweep goes on (the job returns NaN);
  the sweep then exits 1 once every job has run (``hymtl.summaries.SweepSummary``);
* anything else is a bug: its traceback is the report.

A run that stops with a user error before it wrote anything but Hydra's record and its log
leaves no folder (:func:`hymtl.runs.release_unused_run_dir`); one that did keeps it, with
``error.json`` (:func:`hymtl.runs.write_error_json`: in the run's folder, also when a resume
continued the run in the folder of its checkpoint).

The console is quiet (:class:`QuietConsole`, the console handler's filter in
``conf/hydra/default.yaml``): what the user cannot act on goes only to the run folder's log
file; ``verbose=true`` or Hydra's ``hydra.verbose`` brings it back. :func:`route_library_messages`
sends Python warnings and Lightning's own console output through those same handlers.

Importing this module registers the ``${hymtl_…:}`` resolvers of ``conf/``. It imports neither
torch nor Lightning, so ``--help`` stays fast.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import traceback
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

from omegaconf import DictConfig, OmegaConf

from hymtl import distributed, runs, runtime
from hymtl.config import check_targets, nearest
from hymtl.errors import first_line, printable, user_error
from hymtl.runtime import config_dir
from hymtl.usage import RESOLVERS as HELP_RESOLVERS

log = logging.getLogger("hymtl")

T = TypeVar("T")

#: exit code of a user error (bad input or environment the user can fix)
USER_ERROR_EXIT = 2
#: exit code when a DDP rank lost the others
RANK_FAILURE_EXIT = 1


def register_resolvers() -> None:
    """The ``${hymtl_…:}`` interpolations used in ``conf/`` (idempotent)."""
    resolvers: dict[str, tuple[Callable[..., Any], bool]] = {
        # conf/trainer/default.yaml: bf16 where the hardware has it
        "hymtl_precision": (runtime.auto_precision, False),
        # conf/mode/auto.yaml: its default budget holds on a CPU only
        "hymtl_on_cpu_only": (runtime.on_cpu_only, False),
        # conf/trainer/ddp*.yaml: torchrun's process counts
        "hymtl_devices": (distributed.devices_per_node, False),
        "hymtl_num_nodes": (distributed.num_nodes, False),
        # conf/hydra/default.yaml: one run folder for every rank of a launch
        "hymtl_now": (distributed.launch_time_string, True),
        # ... and one run per run folder: <time>_2, <time>_3… when <time> is taken
        "hymtl_run_dir": (runs.claim_run_dir, True),
        "hymtl_rank_zero": (distributed.on_rank_zero, False),
        "hymtl_rank_suffix": (distributed.rank_suffix, False),
        # conf/eval.yaml: <run of the checkpoint>/eval
        "hymtl_eval_dir": (runs.eval_dir, False),
    }
    # conf/hydra/help/hymtl.yaml: --help (hymtl.usage)
    resolvers.update({name: (function, False) for name, function in HELP_RESOLVERS.items()})
    for name, (function, cached) in resolvers.items():
        OmegaConf.register_new_resolver(name, function, use_cache=cached, replace=True)


register_resolvers()


def in_multirun() -> bool:
    """True inside one job of a Hydra multirun (``-m``)."""
    return distributed.in_hydra_multirun()


# --------------------------------------------------------------------------- the console
#: what the user cannot act on: (why it is hidden, logger name prefix, pattern of the message)
CONSOLE_NOISE: tuple[tuple[str, str, re.Pattern], ...] = (
    ("advertisement", "lightning", re.compile(r"^\W*Tip: ")),  # "💡 Tip: ... litlogger / litmodels"
    ("accelerator inventory", "lightning",
     re.compile(r"^(GPU|TPU|HPU|IPU) available: |^LOCAL_RANK: \d+ - CUDA_VISIBLE_DEVICES")),
    # the run's own per-epoch line and the end of the run say it (the saves stay in the log file)
    ("checkpoint saves", "lightning", re.compile(r"^Epoch \d+, global step \d+: ")),
    # frozen layers (their BatchNorm included) are in eval mode on purpose (hymtl.model)
    ("frozen on purpose", "py.warnings", re.compile(r"module\(s\) in eval mode at the start of training")),
    # a library's use of another library's deprecated API (the path is site-packages/…)
    ("library deprecation", "py.warnings",
     re.compile(r"[/\\](?:site|dist)-packages[/\\](?!hymtl[/\\]).*?:\d+: .*(?:deprecat|FutureWarning)",
                re.IGNORECASE | re.DOTALL)),
)


def _is_verbose(setting: Any) -> bool:
    """``verbose=true``, ``hydra.verbose=true`` or ``hydra.verbose=[logger, …]``: all to the console."""
    if isinstance(setting, str):
        return setting.strip().lower() not in ("", "false", "0", "no", "off")
    if isinstance(setting, (list, tuple)) or OmegaConf.is_list(setting):
        return len(setting) > 0
    return bool(setting)


class QuietConsole(logging.Filter):
    """The console handler's filter (``conf/hydra/default.yaml``; the log file has none).

    Drops what the user cannot act on (:data:`CONSOLE_NOISE`: Lightning's advertisements and
    accelerator inventory, its per-epoch checkpoint notices, the eval-mode warning for frozen
    layers, deprecation warnings raised inside libraries) unless ``verbose``/``hydra_verbose``
    is set, and always the records logged with ``extra={"console": False}`` (the log file's copy
    of lines the run prints itself, or of a progress bar's view)."""

    def __init__(self, verbose: Any = False, hydra_verbose: Any = False) -> None:
        super().__init__()
        self.verbose = _is_verbose(verbose) or _is_verbose(hydra_verbose)

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "console", True) is False:
            return False
        return self.verbose or self.noise(record) is None

    @staticmethod
    def noise(record: logging.LogRecord) -> str | None:
        """Why ``record`` stays off the console (a :data:`CONSOLE_NOISE` reason), or ``None``."""
        message = None
        for reason, logger, pattern in CONSOLE_NOISE:
            if record.name == logger or record.name.startswith(logger + "."):
                message = record.getMessage() if message is None else message
                if pattern.search(message):
                    return reason
        return None


def route_library_messages() -> None:
    """Python warnings and Lightning's messages through the handlers of ``conf/hydra/``.

    * ``warnings.warn`` (Lightning's ``rank_zero_warn`` included) goes to the ``py.warnings``
      logger (``logging.captureWarnings``): filtered on the console, complete in the log file;
    * importing ``lightning`` gives its logger a stderr handler of its own
      (``lightning/__init__.py``; ``lightning.pytorch``/``lightning.fabric`` too, when imported
      before any logging was configured): every Lightning message a second time, unfiltered.
      It is imported here and those handlers removed; the messages reach the root's handlers.

    Only where the console is ours (a handler with :class:`QuietConsole`): an entry point with
    ``hydra/job_logging: none`` keeps Python's and Lightning's defaults."""
    root = logging.getLogger()
    if not any(isinstance(f, QuietConsole) for h in root.handlers for f in h.filters):
        return
    logging.captureWarnings(True)
    import lightning  # noqa: F401  (the entry points import it next anyway)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        package_logger = logging.getLogger(name)
        for handler in list(package_logger.handlers):
            if type(handler) is logging.StreamHandler and handler.stream in (sys.stderr, sys.stdout):
                package_logger.removeHandler(handler)
        package_logger.propagate = True


# --------------------------------------------------------------------------- the Hydra main
#: Hydra reports a failed composition itself (several lines, exit 1) unless this is set: then
#: it raises, and :func:`hymtl_main` reports. Set around Hydra's main, not inside a task.
_RAISE_ENV = "HYDRA_FULL_ERROR"
_users_raise_setting: list[str | None] = []  # the user's own value, while hymtl_main runs


def hymtl_main(config_name: str) -> Callable[[Callable[[DictConfig], Any]], Callable[[], Any]]:
    """``@hydra.main`` for an entry point composing ``conf/<config_name>.yaml``, with one error
    policy for what Hydra refuses before the task runs: an unknown group option
    (``mode=bogus``), key (``data.labels_csv=x``) or a malformed override prints one
    ``error:`` line naming it and the nearest valid ones and exits 2 (Hydra's own report is a
    dozen lines and exit 1). A bug in the task keeps its traceback (exit 1; all of it, as with
    ``HYDRA_FULL_ERROR=1``). Everything else is Hydra's: ``--help`` (``conf/hydra/help/``),
    ``--cfg``, ``-m``, ``--info``, shell completion, ``hydra.verbose``."""
    import hydra

    def decorate(task_main: Callable[[DictConfig], Any]) -> Callable[[], Any]:
        # the task itself goes to Hydra: its module and file name the job (train.log, .hydra/)
        hydra_main = hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(task_main)

        @functools.wraps(task_main)
        def main() -> Any:
            with _hydra_raises():
                try:
                    return hydra_main()
                except Exception as exc:  # noqa: BLE001 - sorted below: a config error or not
                    message = None if getattr(exc, "_hymtl_task", False) else config_error_message(exc)
                    if message is None:
                        raise
                    runs.release_unused_run_dirs()  # a sweep folder claimed before a job's config failed
                    print(f"error: {printable(message)[:2000]}", file=sys.stderr, flush=True)
                    sys.exit(USER_ERROR_EXIT)

        return main

    return decorate


@contextmanager
def _hydra_raises() -> Iterator[None]:
    _users_raise_setting.append(os.environ.get(_RAISE_ENV))
    os.environ[_RAISE_ENV] = "1"
    try:
        yield
    finally:
        _restore_env(_users_raise_setting.pop())


def _restore_env(value: str | None) -> None:
    if value is None:
        os.environ.pop(_RAISE_ENV, None)
    else:
        os.environ[_RAISE_ENV] = value


@contextmanager
def _users_environment() -> Iterator[None]:
    """The task runs with the user's ``HYDRA_FULL_ERROR``: the processes it starts (DDP ranks,
    data workers) inherit the user's environment, not :func:`hymtl_main`'s switch."""
    if not _users_raise_setting:
        yield
        return
    _restore_env(_users_raise_setting[-1])
    try:
        yield
    finally:
        os.environ[_RAISE_ENV] = "1"


def config_error_message(exc: BaseException) -> str | None:
    """One line for a config that Hydra could not compose, naming the key or option and the
    nearest valid ones; ``None`` for anything that is not a config error (a bug)."""
    from hydra.errors import HydraException, MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    chain, seen = [], exc
    while seen is not None and len(chain) < 16:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    missing = next((e for e in chain if isinstance(e, MissingConfigException)), None)
    if missing is not None and missing.options is not None and missing.missing_cfg_file:
        group, _, option = str(missing.missing_cfg_file).rpartition("/")
        options = [o for o in missing.options if not o.startswith("_")]
        return f"{group}={option}: no such option in {group}; {nearest(option, options, 'options')}"
    key_error = next((e for e in chain if isinstance(e, (ConfigKeyError, ConfigAttributeError)) and e.full_key), None)
    if key_error is not None and key_error.parent_node is not None:
        return _unknown_key_message(str(key_error.full_key), key_error.parent_node)
    if not isinstance(exc, (HydraException, OmegaConfBaseException)):
        return None
    if isinstance(exc, OverrideParseException):  # Hydra's grammar: https://hydra.cc/docs/advanced/override_grammar/basic/
        return f"cannot read the override {exc.override!r}: {first_line(exc)}"
    lines = [first_line(e) for e in chain[:2]]
    return lines[0] + (f" ({lines[1]})" if len(lines) > 1 and lines[1] not in lines[0] else "")


def _unknown_key_message(key: str, parent: Any) -> str:
    """``data.labels_csv is not a key; did you mean …`` (siblings first, then the same name
    anywhere: ``precision`` -> ``trainer.precision``)."""
    root = parent._get_root()
    known = [k for k in _dotted_keys(root) if not k.startswith("hydra.") and k != "hydra"]
    leaf = key.rpartition(".")[2]
    same_name = [k for k in known if k.rpartition(".")[2] == leaf]
    if same_name:
        return f"unknown key {key}; did you mean {', '.join(same_name[:3])}?"
    prefix = key.rpartition(".")[0]
    siblings = [k.rpartition(".")[2] for k in known if k.rpartition(".")[0] == prefix]
    hint = nearest(leaf, siblings, "keys" if prefix else "top-level keys", f"{prefix}." if prefix else "")
    return f"unknown key {key}; {hint}" + ("" if hint.startswith("did you") else f" (+{key}=… adds a new key)")


def _dotted_keys(node: Any, prefix: str = "") -> Iterator[str]:
    """Every key of a config as ``a.b.c`` (interpolations not followed)."""
    if not isinstance(node, DictConfig) or node._is_none() or node._is_missing() or node._is_interpolation():
        return
    for key in node.keys():
        name = f"{prefix}{key}"
        yield name
        yield from _dotted_keys(node._get_node(key), name + ".")


def run_entry(task: Callable[[DictConfig], T], cfg: DictConfig, stopped: str | None = None,
              phase: str = "the start of the run") -> T | float:
    """Run ``task(cfg)`` under the error policy of the module docstring; return its value
    (``nan`` for a failed job of a multirun).

    ``stopped``: what a SIGINT/SIGTERM leaves, in words, for a task that installs no signal
    handling of its own (eval, predict, export; train has :class:`hymtl.signals.RunSignals`
    with its checkpoints): the task then runs inside ``RunSignals(outcome=stopped)``, and a
    signal ends it with ``interrupted by SIG… during <phase>; <stopped>`` and 130/143."""
    route_library_messages()
    try:
        with _users_environment():
            check_targets(cfg)  # keys and values that what they configure does not take: one line
            if stopped is None:
                return task(cfg)
            from hymtl.signals import RunSignals

            with RunSignals(outcome=stopped, phase=phase):
                return task(cfg)
    except Exception as exc:
        error = user_error(exc)
        if in_multirun():  # one job failed: report and record it, the sweep goes on
            record_failure(exc, error)
            return float("nan")
        failure = distributed.rank_failure_message(exc) if error is None else None
        if failure is not None:  # not gloo's/NCCL's traceback
            print(f"error: {failure}", file=sys.stderr, flush=True)
            sys.exit(RANK_FAILURE_EXIT)
        if error is None:
            _mark_from_task(exc)  # a bug in the task: hymtl_main lets its traceback through
            raise
        # the folder of a run that never trained goes; a run that wrote something is marked failed
        runs.release_unused_run_dir()
        write_error_json(exc, error)
        print(f"error: {printable(str(error))}", file=sys.stderr, flush=True)
        sys.exit(getattr(error, "exit_code", USER_ERROR_EXIT))
    except BaseException as exc:
        from hymtl.signals import RunInterrupted

        if isinstance(exc, RunInterrupted):  # state saved; a sweep stops as a whole
            print(exc.message, file=sys.stderr, flush=True)
            sys.exit(exc.exit_code)
        raise


def _mark_from_task(exc: BaseException) -> None:
    try:
        exc._hymtl_task = True  # type: ignore[attr-defined]
    except AttributeError:  # an exception type without a __dict__: then it is not Hydra's either
        pass


#: the jobs of this process's multirun that failed (the sweep goes on; its exit code says so)
_FAILED_JOBS: list[str] = []


def failed_jobs() -> list[str]:
    """The messages of the multirun jobs that failed in this process (basic launcher)."""
    return list(_FAILED_JOBS)


def record_failure(exc: BaseException, error: BaseException | None) -> None:
    """Log a failed multirun job and write ``error.json`` in its run folder."""
    message = _failure_message(exc, error)
    _FAILED_JOBS.append(message)
    if error is None:  # a bug or an environment problem: the traceback is the report
        log.exception("run failed: %s", message)
    else:
        log.error("run failed: %s", message)
    write_error_json(exc, error)


def _failure_message(exc: BaseException, error: BaseException | None) -> str:
    """The user error's text, else ``Type: text`` of the innermost cause (Hydra's
    ``InstantiationException`` wraps the real error; bounded: no cycles)."""
    if error is not None:
        return str(error)
    root = exc
    for _ in range(16):
        if root.__cause__ is None:
            break
        root = root.__cause__
    return f"{type(root).__name__}: {root}"


def write_error_json(exc: BaseException, error: BaseException | None) -> None:
    """What went wrong (message, type, traceback), as ``error.json`` in the folder of the
    training run that failed (:func:`hymtl.runs.write_error_json` says which folder, and when)."""
    message = _failure_message(exc, error)
    try:
        runs.write_error_json({
            "error": message.strip().splitlines()[0] if message.strip() else type(exc).__name__,
            "type": type(error).__name__ if error is not None else message.split(":", 1)[0],
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        })
    except Exception:  # noqa: BLE001 - never let the report of one failure end the sweep
        log.exception("could not write error.json")
