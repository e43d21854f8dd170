"""Interrupted runs resume and lose nothing; a kill never leaves a corrupt checkpoint.

The kill tests use real processes and SIGKILL (no mocks): a training run killed after its
first checkpoint, resumed, must end with exactly the metrics of an uninterrupted run of the
same seed; a process killed while it rewrites checkpoints and metrics.json in a loop must leave
files that load.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, SMALL_VIEWS, cached_rows, entry_command, make_image_folder
from hymtl.checkpoints import AtomicCheckpointIO
from hymtl.runs import LAST, resolve_resume, run_dir_of
from hymtl.errors import HymtlError

# two-phase so that the resumed run must also land in the right phase (unfreeze at epoch 1)
ARGS = [
    "model=efficientnet_lite0", "model.pretrained=false", "data=folder", "data.num_workers=0",
    "data.batch_size=4", "mode=two_phase", "mode.freeze_epochs=1", "mode.epochs=3",
    "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
    "callbacks.test_figures=null", "mode.precompute_features=false",
    "callbacks.last_checkpoint.min_interval_s=0",  # last.ckpt after every epoch: the kill tests stop between them
    SMALL_VIEWS,  # what is saved and resumed does not depend on the image size: 64 px, a fraction of the work
]
COMPARED = ("train/loss", "train/acc", "val/acc", "val/loss", "val/acc_best", "test/acc", "test/loss", "epochs")


def _train(cwd: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*entry_command("hymtl.train"), *ARGS, *overrides], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "HYMTL_CACHE_DIR": str(cwd / "cache")})


def _scalar_steps(run: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: dict[int, float] = {}
    for events in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            steps.update({e.step: e.value for e in acc.Scalars(tag)})
    return steps


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4)
    reference = _train(tmp_path, f"data.root={data}", "hydra.run.dir=ref")
    assert reference.returncode == 0, reference.stderr[-3000:]

    # the same command, killed with SIGKILL as soon as its first checkpoint is on disk
    proc = subprocess.Popen([sys.executable, "-m", "hymtl.train", *ARGS, f"data.root={data}", "hydra.run.dir=run"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HYMTL_CACHE_DIR": str(tmp_path / "cache")})
    last = tmp_path / "run" / "checkpoints" / LAST
    deadline = time.monotonic() + 600
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "run" / "metrics.json").exists()
    killed_at_epoch = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert killed_at_epoch < 2

    # resume from a new Hydra folder: the run continues in the folder of its checkpoint
    resumed = _train(tmp_path, f"data.root={data}", "hydra.run.dir=resume", f"ckpt_path={last}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ref = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    got = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in COMPARED:
        assert got[key] == ref[key], (key, got[key], ref[key], killed_at_epoch)
    # TensorBoard: the resumed curve continues at the steps of the uninterrupted one
    assert _scalar_steps(tmp_path / "run", "val/acc") == _scalar_steps(tmp_path / "ref", "val/acc")
    assert sorted(_scalar_steps(tmp_path / "run", "train/loss_step")) == sorted(
        _scalar_steps(tmp_path / "ref", "train/loss_step"))


_WRITER = r"""
import sys, torch
from hymtl.checkpoints import AtomicCheckpointIO
from hymtl.fileio import atomic_write_json
folder = sys.argv[1]
io = AtomicCheckpointIO()
i = 0
while True:  # rewrite both files forever; the parent kills us mid-write
    i += 1
    ckpt = {"version": i, "weights": torch.full((4_000_000,), float(i))}  # 16 MB: writes take a while
    io.save_checkpoint(ckpt, f"{folder}/last.ckpt")
    atomic_write_json(f"{folder}/metrics.json", {"version": i, "pad": "x" * 2_000_000})
"""


def _stop_mid_write(proc: subprocess.Popen, folder: Path, want: str, left: set[Path], deadline: float) -> bool:
    """Freeze ``proc`` (SIGSTOP) while a temp file ``want`` of its own is beside the target, after a
    first complete round; ``False`` if none was seen by ``deadline``. Seen and frozen in one step:
    on a slow or busy machine the write could otherwise end between the look and the kill."""
    while time.monotonic() < deadline and proc.poll() is None:
        if (folder / "metrics.json").exists() and set(folder.glob(want)) - left:
            proc.send_signal(signal.SIGSTOP)
            os.waitpid(proc.pid, os.WUNTRACED)  # stopped: the folder no longer changes
            if set(folder.glob(want)) - left:
                return True
            proc.send_signal(signal.SIGCONT)  # the write ended in between: look again
        time.sleep(0.001)
    return False


@pytest.mark.slow
def test_sigkill_during_checkpoint_and_metrics_writes_never_leaves_a_corrupt_file(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    kills_mid_write = 0
    for attempt in range(4):
        left = set(folder.glob(".*.tmp"))  # left by the writers killed before: not this one's
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(folder)], cwd=REPO_ROOT)
        try:
            # even attempts kill a write of last.ckpt, odd ones one of metrics.json
            want = ".last.ckpt.*.tmp" if attempt % 2 == 0 else ".metrics.json.*.tmp"
            in_flight = _stop_mid_write(proc, folder, want, left, time.monotonic() + 600)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        kills_mid_write += in_flight
        ckpt = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
        assert torch.equal(ckpt["weights"], torch.full((4_000_000,), float(ckpt["version"])))
        if (folder / "metrics.json").exists():
            json.loads((folder / "metrics.json").read_text())
    assert kills_mid_write == 4  # every kill landed while a temp file of its writer was being written
    # the next successful write clears the temp files that the killed writers left
    AtomicCheckpointIO().save_checkpoint({"version": 0}, folder / "last.ckpt")
    assert not list(folder.glob(".last.ckpt.*.tmp"))
    umask = os.umask(0)
    os.umask(umask)
    assert (folder / "last.ckpt").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_ckpt_path_last_resolution(tmp_path):
    outputs = tmp_path / "outputs"

    def run(rel: str, mtime: float) -> Path:
        ckpt = outputs / rel / "checkpoints" / LAST
        ckpt.parent.mkdir(parents=True)
        (outputs / rel / ".hydra").mkdir()
        ckpt.write_bytes(b"x")
        os.utime(ckpt, (mtime, mtime))
        return ckpt

    older = run("2026-01-01/10-00-00", 1_000)
    newer = run("2026-01-02/09-00-00", 2_000)
    run("multirun/2026-01-03/00-00-00/0", 3_000)  # sweeps are never "the newest run"
    fresh = outputs / "2026-01-04" / "12-00-00"
    fresh.mkdir(parents=True)

    resume = resolve_resume("last", fresh, outputs)
    assert resume.checkpoint == newer and resume.run_dir == newer.parent.parent.resolve()
    # a reused run folder (hydra.run.dir=...) resumes its own last.ckpt
    assert resolve_resume("last", older.parent.parent, outputs).checkpoint == older
    assert resolve_resume(None, fresh, outputs) is None
    assert resolve_resume(str(older), fresh, outputs).run_dir == older.parent.parent.resolve()
    loose = tmp_path / "elsewhere.ckpt"
    loose.write_bytes(b"x")
    assert run_dir_of(loose) is None  # not inside a run folder: the new run folder is used
    with pytest.raises(HymtlError, match="no checkpoint file"):
        resolve_resume(str(tmp_path / "missing.ckpt"), fresh, outputs)
    with pytest.raises(HymtlError, match="ckpt_path=last: no last.ckpt"):
        resolve_resume("last", fresh, tmp_path / "empty")


@pytest.mark.slow
@pytest.mark.parametrize("signum, workers", [(signal.SIGINT, 1), (signal.SIGTERM, 0)])
def test_sigint_and_sigterm_stop_cleanly_with_a_checkpoint(tmp_path, signum, workers):
    """Ctrl-C reaches the whole process group (DataLoader workers too); SIGTERM the main process."""
    data = make_image_folder(tmp_path / "data", per_class=4)
    proc = subprocess.Popen([sys.executable, "-m", "hymtl.train", *ARGS, f"data.root={data}", "hydra.run.dir=run",
                             f"data.num_workers={workers}", "mode.epochs=50"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=(tmp_path / "stderr").open("w"),
                            start_new_session=True, env={**os.environ, "HYMTL_CACHE_DIR": str(tmp_path / "cache")})
    last = tmp_path / "run" / "checkpoints" / LAST
    deadline = time.monotonic() + 600
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)  # what a terminal's Ctrl-C does
    else:
        proc.send_signal(signum)
    proc.wait(timeout=300)
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 128 + signum, stderr[-3000:]
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    assert line.startswith(f"interrupted by {name} in epoch ") and "resume with ckpt_path=last" in line, line
    interrupted = torch.load(tmp_path / "run" / "checkpoints" / "interrupted.ckpt", map_location="cpu",
                             weights_only=True)
    assert interrupted["global_step"] >= torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert "RNGStateCheckpoint" in interrupted["callbacks"]


def sigterm_at(hook: str):
    """A callback (``+callbacks.kill._target_=test_resume.sigterm_at +callbacks.kill.hook=<hook>``)
    that sends this process SIGTERM when Lightning calls ``hook``: what a scheduler does when a
    job's time runs out."""
    from lightning.pytorch.callbacks import Callback

    class _Signal(Callback):
        pass

    setattr(_Signal, hook, lambda self, *args, **kwargs: os.kill(os.getpid(), signal.SIGTERM))
    return _Signal()


def _train_until_sigterm(tmp_path: Path, hook: str, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*entry_command("hymtl.train"), *overrides, "hydra.run.dir=run",
         "+callbacks.kill._target_=test_resume.sigterm_at", f"+callbacks.kill.hook={hook}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HYMTL_CACHE_DIR": str(tmp_path / "cache"),
             "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))},
    )


@pytest.mark.slow
def test_sigterm_during_the_test_exits_non_zero_and_says_what_was_saved(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=4)
    result = _train_until_sigterm(tmp_path, "on_test_batch_start", *ARGS, f"data.root={root}", "mode.epochs=2")
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted by SIGTERM during the test; training had finished and its checkpoints "
                           f"are saved (best: {tmp_path / 'run' / 'checkpoints'}/best-"), last
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


# --------------------------------------------------------------------------- what may be resumed
FROZEN = ["model=efficientnet_lite0", "model.pretrained=false", "data=folder", "data.num_workers=0", "data.batch_size=4",
          "mode=frozen", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1",
          "+trainer.limit_test_batches=1", "callbacks.test_figures=null"]


def _frozen(cwd: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*entry_command("hymtl.train"), *FROZEN, *overrides], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "HYMTL_CACHE_DIR": str(cwd / "cache")})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished one-epoch ``mode=frozen`` run on ``<base>/A`` in ``<base>/run``; ``<base>/B``
    holds other images of the same class names. Tests copy it (:func:`_copy_run`)."""
    base = tmp_path_factory.mktemp("resume_run")
    make_image_folder(base / "A", per_class=4)
    make_image_folder(base / "B", per_class=5)
    result = _frozen(base, f"data.root={base / 'A'}", "mode.epochs=1", "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr[-3000:]
    return base / "run"


def _copy_run(run: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def _stamps(run: Path) -> dict[str, tuple[int, bytes]]:
    """Every file of a run folder with its mtime and bytes: what "untouched" means."""
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_resume_with_other_data_is_refused_before_the_run_folder_is_touched(finished_run, tmp_path):
    run = _copy_run(finished_run, tmp_path)
    data_a, data_b = finished_run.parent / "A", finished_run.parent / "B"
    before = _stamps(run)
    # from a new Hydra folder (the resume writes to the checkpoint's run folder) and in place
    # (hydra.run.dir=<run>: Hydra would write the new config over the run's .hydra/)
    for where in ("hydra.run.dir=elsewhere", f"hydra.run.dir={run}"):
        refused = _frozen(tmp_path, f"data.root={data_b}", "mode.epochs=2", where, f"ckpt_path={run}/checkpoints/last.ckpt")
        assert refused.returncode == 2, (where, refused.stderr[-3000:])
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
        assert lines[0] == (f"error: cannot resume {run}/checkpoints/last.ckpt: data.root differs (was {data_a}, now "
                            f"{data_b}) (a resume must run with its run's settings; start a new run to change them)"), lines
        assert _stamps(run) == before, where  # metrics.json, skipped.txt, .hydra/, checkpoints: the run's own
    # every difference in the one line
    refused = _frozen(tmp_path, f"data.root={data_a}", "mode.epochs=2", "mode.feature_views=1", "data.val_fraction=0.5",
                      "hydra.run.dir=elsewhere", f"ckpt_path={run}/checkpoints/last.ckpt")
    assert refused.returncode == 2
    assert "data.val_fraction differs (was 0.2, now 0.5); mode.feature_views differs (was 2, now 1)" in refused.stderr
    # the same settings (a relative data.root naming the same folder) resume in the run's folder
    resumed = subprocess.run([*entry_command("hymtl.train"), *FROZEN, "data.root=A", "mode.epochs=2",
                              f"hydra.run.dir={run}", "ckpt_path=last"], cwd=finished_run.parent, capture_output=True,
                             text=True, timeout=600, env={**os.environ, "HYMTL_CACHE_DIR": str(tmp_path / "cache")})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 2


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "flipped bytes":  # inside the weights: torch.load alone would not notice
        middle = len(data) // 2
        data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    else:
        data = data[: len(data) * 2 // 3]
    path.write_bytes(bytes(data))


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flipped bytes", "truncated"])
def test_resume_from_a_damaged_checkpoint_is_refused_and_trains_nothing(finished_run, tmp_path, how):
    run = _copy_run(finished_run, tmp_path)
    _damage(run / "checkpoints" / LAST, how)
    before = _stamps(run)
    refused = _frozen(tmp_path, f"data.root={finished_run.parent / 'A'}", "mode.epochs=2", "hydra.run.dir=elsewhere",
                      f"ckpt_path={run}/checkpoints/last.ckpt")
    assert refused.returncode == 2, refused.stderr[-3000:]
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot resume {run}/checkpoints/last.ckpt: cannot read "
                                                    "checkpoint "), refused.stderr[-3000:]
    assert _stamps(run) == before  # no epoch trained, no file of the run rewritten


def test_checkpoint_io_reads_through_the_safe_loader(tiny_checkpoint, tmp_path):
    """What Lightning reads on resume (and for the test of the best checkpoint) is checked as
    eval/predict/export check it: a damaged tensor is refused, a whole file loads."""
    from hymtl.loading import LoadError

    whole = AtomicCheckpointIO().load_checkpoint(tiny_checkpoint)
    assert "state_dict" in whole and "hyper_parameters" in whole
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(tiny_checkpoint.read_bytes())
    _damage(damaged, "flipped bytes")
    with pytest.raises(LoadError, match="fails its CRC check"):
        AtomicCheckpointIO().load_checkpoint(damaged)


# --------------------------------------------------------------------------- signals outside the loops
@pytest.mark.slow
def test_sigterm_during_feature_extraction_stops_within_a_few_batches(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=150)  # 300 training images to extract
    cache = tmp_path / "cache"
    # one image (3 views) per extraction batch and a cache shard per batch: the cache shows where it is
    proc = subprocess.Popen([sys.executable, "-m", "hymtl.train", *FROZEN, f"data.root={root}", "mode.epochs=1",
                             "feature_cache.batch_size=3", "feature_cache.flush_seconds=0", "hydra.run.dir=run"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=(tmp_path / "stderr").open("w"),
                            env={**os.environ, "HYMTL_CACHE_DIR": str(cache)})
    deadline = time.monotonic() + 600
    while cached_rows(cache) == 0 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, (tmp_path / "stderr").read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    at_signal = cached_rows(cache)
    proc.wait(timeout=300)
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "interrupted by SIGTERM during the feature extraction; no epoch had finished, so nothing of the run is saved: "
        "a new run starts from scratch (the feature cache keeps the features computed so far)")
    assert cached_rows(cache) <= at_signal + 5  # a few batches, not the other ~300 images
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))


@pytest.mark.slow
def test_sigterm_during_the_file_scan_stops_at_once(tmp_path):
    import shutil

    root = make_image_folder(tmp_path / "data", per_class=1)
    for name in ("ants", "bees"):  # 40 000 files: a scan of several seconds
        first = root / "train" / name / f"{name}_0.jpg"
        for i in range(1, 20_000):
            shutil.copyfile(first, first.with_name(f"{name}_{i}.jpg"))
    proc = subprocess.Popen([sys.executable, "-m", "hymtl.train", *FROZEN, f"data.root={root}", "mode.epochs=1",
                             "mode.precompute_features=false", "hydra.run.dir=run"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=(tmp_path / "stderr").open("w"), text=True,
                            env={**os.environ, "HYMTL_CACHE_DIR": str(tmp_path / "cache")})
    import threading

    watchdog = threading.Timer(1200, proc.kill)  # a run that never logs its scan fails, not hangs
    watchdog.start()
    for line in proc.stdout:  # the log says when the scan starts
        if "checking the files of" in line:
            proc.send_signal(signal.SIGTERM)
            break
    else:
        pytest.fail("the run did not log the start of its file scan: " + (tmp_path / "stderr").read_text()[-3000:])
    proc.stdout.read()
    proc.wait(timeout=600)
    watchdog.cancel()
    stderr = (tmp_path / "stderr").read_text()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "interrupted by SIGTERM during the file scan; no epoch had finished, so nothing of the run is saved: "
        "a new run starts from scratch")
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.slow
def test_sigterm_while_writing_the_results_exits_non_zero_and_says_what_was_saved(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=4)
    result = _train_until_sigterm(tmp_path, "on_test_epoch_end", *FROZEN, f"data.root={root}", "mode.epochs=1")
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("interrupted by SIGTERM while writing the results (figures, metrics.json); training and "
                           "the test had finished and the checkpoints are saved (best: "
                           f"{tmp_path / 'run' / 'checkpoints'}/best-"), line
    assert not (tmp_path / "run" / "metrics.json").exists()  # RunSummary writes it after the epoch end


@pytest.mark.slow
def test_resume_on_the_same_folder_with_other_images_is_refused(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=4)
    assert _frozen(tmp_path, f"data.root={data}", "mode.epochs=1", "hydra.run.dir=run").returncode == 0
    metrics = (tmp_path / "run" / "metrics.json").read_bytes()
    extra = next((data / "train" / "ants").iterdir())
    shutil.copy(extra, extra.with_name("copy_" + extra.name))  # one more training image, same root and classes
    refused = _frozen(tmp_path, f"data.root={data}", "mode.epochs=2", "hydra.run.dir=elsewhere",
                      f"ckpt_path={tmp_path}/run/checkpoints/last.ckpt")
    assert refused.returncode == 2, refused.stderr[-3000:]
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert lines[0] == (f"error: cannot resume: the images of {data} are not the ones this checkpoint was trained and "
                        "scored on (train: 8 files, now 9); start a new run for new data"), lines
    assert (tmp_path / "run" / "metrics.json").read_bytes() == metrics
    assert len(list((tmp_path / "run" / "checkpoints").glob("epoch=1*"))) == 0  # nothing trained
    # the resume had continued the run in its own folder: the failure is recorded there (hymtl.runs),
    # not in the folder Hydra made for the resuming command
    error = json.loads((tmp_path / "run" / "error.json").read_text())
    assert error["type"] == "DataError" and error["error"] == lines[0].removeprefix("error: ")
    assert not (tmp_path / "elsewhere" / "error.json").exists()


def test_a_stop_in_the_fit_before_any_last_checkpoint_was_due_says_so():
    """With last.ckpt written at most every min_interval_s, epochs can have ended without one:
    the line must not claim that no epoch had finished."""
    from hymtl.signals import RunInterrupted

    early = RunInterrupted(signal.SIGTERM, "/run/checkpoints/interrupted.ckpt", None, 3).message
    assert early == ("interrupted by SIGTERM in epoch 3; state saved in /run/checkpoints/interrupted.ckpt; no "
                     "epoch-end checkpoint was due yet (callbacks.last_checkpoint.min_interval_s), so there is nothing "
                     "to resume from: a new run starts from scratch")
    first = RunInterrupted(signal.SIGTERM, "/run/checkpoints/interrupted.ckpt", None, 0).message
    assert first.endswith("; no epoch had finished, so nothing of the run is saved: a new run starts from scratch")
    saved = RunInterrupted(signal.SIGINT, "/i.ckpt", "/run/checkpoints/last.ckpt", 5).message
    assert "resume with ckpt_path=last (or ckpt_path=/run/checkpoints/last.ckpt): it continues from the end of " \
           "the last saved epoch" in saved
