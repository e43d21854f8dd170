"""What a person sees: a quiet console (noise only in ``train.log``, back with ``verbose``), one
line per epoch where no progress bar shows, and an end that says where the results are.

The runs are real ``python -m hymtl.train`` subprocesses whose output is a pipe (not a terminal),
as under CI or ``… | tee``."""

from __future__ import annotations

import io
import logging
import re
import shlex
import warnings
from pathlib import Path

import pytest

from test_train import TINY_MODEL, run_train

# Lightning's messages the user cannot act on (see hymtl.cli.CONSOLE_NOISE)
ADVERTISEMENT = "💡 Tip:"
INVENTORY = re.compile(r"^.*(GPU|TPU) available: ", re.MULTILINE)
EVAL_MODE = "module(s) in eval mode at the start of training"
CHECKPOINT_NOTICE = re.compile(r"Epoch \d+, global step \d+: ")
LIBRARY_DEPRECATION = re.compile(r"(site|dist)-packages/\S+:\d+: .*deprecat", re.IGNORECASE)
EPOCH_LINE = re.compile(r"epoch (\d) \(\d of 2\): train/loss \d+\.\d{4}, train/acc \d\.\d{4}, "
                        r"val/loss \d+\.\d{4}, val/acc \d\.\d{4} in \d+\.\d s$", re.MULTILINE)


def _train(tiny_folder: Path, cwd: Path, *extra: str):
    # frozen mode: the backbone (BatchNorm included) is in eval mode on purpose, which is what
    # Lightning's eval-mode warning is about
    result = run_train(*TINY_MODEL, "mode=frozen", "mode.epochs=2", "data=folder", f"data.root={tiny_folder}",
                       "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2",
                       f"feature_cache.dir={cwd / 'cache'}", *extra, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = [p for p in (cwd / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1, runs
    return result, runs[0], (runs[0] / "train.log").read_text()


@pytest.fixture(scope="module")
def quiet_run(tmp_path_factory):
    from conftest import make_image_folder

    root = tmp_path_factory.mktemp("quiet")
    return _train(make_image_folder(root / "tiny"), root)


@pytest.mark.slow
def test_the_noise_is_off_the_console_and_in_train_log(quiet_run):
    result, run, train_log = quiet_run
    console = result.stdout + result.stderr
    assert ADVERTISEMENT not in console and "litlogger" not in console
    assert not INVENTORY.search(console)
    assert EVAL_MODE not in console
    assert not CHECKPOINT_NOTICE.search(console)
    assert not LIBRARY_DEPRECATION.search(console)
    # Lightning's own stderr handler is gone: its messages are not printed a second time
    assert not re.search(r"^INFO: ", result.stderr, re.MULTILINE), result.stderr
    # what the user can act on stays: Lightning's end-of-fit message, the precision line
    assert "`Trainer.fit` stopped: `max_epochs=2` reached." in result.stdout

    assert ADVERTISEMENT in train_log and "litlogger" in train_log
    assert "GPU available: False" in train_log and "TPU available: False" in train_log
    assert EVAL_MODE in train_log
    assert CHECKPOINT_NOTICE.search(train_log)


@pytest.mark.slow
def test_without_a_terminal_a_line_per_epoch_replaces_the_bar(quiet_run):
    result, _run, train_log = quiet_run
    assert [int(m) for m in EPOCH_LINE.findall(result.stdout)] == [0, 1]
    assert not re.search(r"it/s|s/it", result.stdout) and "\r" not in result.stdout  # no tqdm bar (either rate unit)
    assert [int(m) for m in EPOCH_LINE.findall(train_log)] == [0, 1]


@pytest.mark.slow
def test_train_log_holds_the_whole_story(quiet_run):
    _result, run, train_log = quiet_run
    assert "feature extraction: " in train_log  # the phases before training
    assert re.search(r"test on the val split: test/acc \d\.\d{4}, test/acc_macro \d\.\d{4}, test/loss \d", train_log)
    checkpoints = re.findall(r"checkpoint: (\S+\.ckpt)( \(best\))?$", train_log, re.MULTILINE)
    assert {Path(p).name for p, _ in checkpoints} >= {"last.ckpt"}
    best = [p for p, mark in checkpoints if mark]
    assert len(best) == 1 and Path(best[0]).name.startswith("best-") and Path(best[0]).is_file()
    assert "Restoring states from the checkpoint path" in train_log  # Lightning's own messages
    assert re.search(r"loss \d+\.\d{3}, train acc \d\.\d{3}, test acc \d\.\d{3}$", train_log, re.MULTILINE)
    assert "dashboard: tensorboard --logdir" in train_log


@pytest.mark.slow
def test_the_end_says_where_the_results_are(quiet_run):
    result, run, _log = quiet_run
    cwd = run.parents[2]
    lines = result.stdout.strip().splitlines()[-6:]
    assert re.fullmatch(r"loss \d+\.\d{3}, train acc \d\.\d{3}, test acc \d\.\d{3}", lines[0]), lines
    assert re.fullmatch(r"\d+\.\d examples/sec on cpu", lines[1]), lines
    # macro accuracy beside accuracy: a class the model never gets right shows here
    assert re.fullmatch(r"test acc macro \d\.\d{3} \(the mean of the per-class accuracies\)", lines[2]), lines
    lines = lines[:2] + lines[3:]
    assert lines[2].startswith("run folder: ")
    folder = cwd / lines[2].removeprefix("run folder: ")
    assert folder.resolve() == run.resolve()
    assert lines[3].startswith("best checkpoint: ")
    best = cwd / lines[3].removeprefix("best checkpoint: ")
    assert best.is_file() and best.parent == run / "checkpoints" and best.name.startswith("best-")
    command = shlex.split(lines[4].removeprefix("dashboard: "))
    assert command[:2] == ["tensorboard", "--logdir"] and (cwd / command[2]).resolve() == run.resolve()
    assert list((cwd / command[2]).glob("tensorboard/events.out.tfevents.*"))


@pytest.mark.slow
def test_verbose_brings_the_noise_back_to_the_console(tiny_folder, tmp_path):
    result, _run, train_log = _train(tiny_folder, tmp_path, "verbose=true")
    assert ADVERTISEMENT in result.stdout and "GPU available: False" in result.stdout
    assert EVAL_MODE in result.stdout and CHECKPOINT_NOTICE.search(result.stdout)
    assert ADVERTISEMENT in train_log


def test_hydra_verbose_turns_the_console_filter_off(compose):
    from hymtl.cli import QuietConsole

    def console_filter(*overrides):
        spec = dict(compose(*overrides).hydra.job_logging.filters.quiet_console)
        factory = spec.pop("()")
        assert factory == "hymtl.cli.QuietConsole"
        return QuietConsole(**spec)

    assert not console_filter().verbose
    assert console_filter("verbose=true").verbose
    assert console_filter("hydra.verbose=true").verbose
    assert console_filter("hydra.verbose=[hymtl]").verbose
    handlers = compose().hydra.job_logging.handlers
    assert list(handlers.console.filters) == ["quiet_console"] and "filters" not in handlers.file


def _records_of_a_warning(message: str, filename: str, category=DeprecationWarning) -> tuple[str, str]:
    """A real warning through ``logging.captureWarnings`` into a console handler with the
    filter and a plain (file-like) handler: what each shows."""
    from hymtl.cli import QuietConsole

    console, file = io.StringIO(), io.StringIO()
    console_handler, file_handler = logging.StreamHandler(console), logging.StreamHandler(file)
    console_handler.addFilter(QuietConsole())
    root = logging.getLogger()
    root.addHandler(console_handler)
    root.addHandler(file_handler)
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn_explicit(message, category, filename, 12)
    finally:
        logging.captureWarnings(False)
        root.removeHandler(console_handler)
        root.removeHandler(file_handler)
    return console.getvalue(), file.getvalue()


def test_library_deprecations_are_file_only_and_other_warnings_stay():
    library = "/opt/env/lib/python3.11/site-packages/somelib/core.py"
    console, file = _records_of_a_warning("`old_api` is deprecated, use `new_api`", library)
    assert console == "" and "old_api` is deprecated" in file
    console, file = _records_of_a_warning("`old_api` will change", library, FutureWarning)
    assert console == "" and "old_api" in file
    # the same in the user's own code, or a library warning the user can act on: shown
    console, _ = _records_of_a_warning("`old_api` is deprecated", "/home/me/project/train_my_model.py")
    assert "old_api" in console
    console, _ = _records_of_a_warning("The number of training batches (3) is smaller than the logging interval",
                                       library, UserWarning)
    assert "number of training batches" in console


def test_file_only_records_never_reach_the_console():
    from hymtl.cli import QuietConsole

    record = logging.LogRecord("hymtl.callbacks", logging.INFO, __file__, 1, "run folder: x", None, None)
    record.console = False
    assert not QuietConsole(verbose=True).filter(record)
    tip = logging.LogRecord("lightning.pytorch.utilities.rank_zero", logging.INFO, __file__, 1,
                            "💡 Tip: For seamless cloud logging …", None, None)
    assert not QuietConsole().filter(tip) and QuietConsole(verbose=True).filter(tip)
    assert QuietConsole.noise(tip) == "advertisement"
