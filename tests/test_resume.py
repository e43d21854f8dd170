"""Interrupted runs resume and lose nothing; a kill never leaves a corrupt checkpoint.

The kill tests use real processes and SIGKILL (no mocks): a training run killed after its
first checkpoint, resumed, must end with exactly the metrics of an uninterrupted run of the
same seed; a process killed while it rewrites checkpoints and metrics.json in a loop must leave
files that load.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT, make_image_folder
from hymtl.resume import LAST, AtomicCheckpointIO, resolve_resume
from hymtl.runs import run_dir_of
from hymtl.errors import HymtlError

# two-phase so that the resumed run must also land in the right phase (unfreeze at epoch 1)
ARGS = [
    "model=efficientnet_lite0", "model.pretrained=false", "data=folder", "data.num_workers=0",
    "data.batch_size=4", "mode=two_phase", "mode.freeze_epochs=1", "mode.epochs=3",
    "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", "+trainer.limit_test_batches=1",
    "callbacks.test_figures=null", "mode.precompute_features=false",
]
COMPARED = ("train/loss", "train/acc", "val/acc", "val/loss", "val/acc_best", "test/acc", "test/loss", "epochs")


def _train(cwd: Path, *overrides: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hymtl.train", *ARGS, *overrides], cwd=cwd,
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
from hymtl.resume import AtomicCheckpointIO
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


def test_sigkill_during_checkpoint_and_metrics_writes_never_leaves_a_corrupt_file(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    kills_mid_write = 0
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(folder)], cwd=REPO_ROOT)
        try:
            # wait until a write is in flight (its temp file beside the target exists), after a first
            # complete round; even attempts target last.ckpt, odd ones metrics.json
            want = ".last.ckpt.*.tmp" if attempt % 2 == 0 else ".metrics.json.*.tmp"
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if (folder / "metrics.json").exists() and list(folder.glob(want)):
                    break
                time.sleep(0.001)
            in_flight = bool(list(folder.glob(".*.tmp")))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        kills_mid_write += in_flight
        ckpt = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)
        assert torch.equal(ckpt["weights"], torch.full((4_000_000,), float(ckpt["version"])))
        if (folder / "metrics.json").exists():
            json.loads((folder / "metrics.json").read_text())
    assert kills_mid_write >= 2  # most kills landed while a temp file was being written
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


class SignalAtTestStart:
    """A callback (``+callbacks.kill._target_=test_resume.SignalAtTestStart``) that sends this
    process SIGTERM as the test begins: what a scheduler does when a job's time runs out."""

    def __new__(cls):
        from lightning.pytorch.callbacks import Callback

        class _Signal(Callback):
            def on_test_batch_start(self, trainer, pl_module, *args):
                os.kill(os.getpid(), signal.SIGTERM)

        return _Signal()


@pytest.mark.slow
def test_sigterm_during_the_test_exits_non_zero_and_says_what_was_saved(tmp_path):
    root = make_image_folder(tmp_path / "data", per_class=4)
    result = subprocess.run(
        [sys.executable, "-m", "hymtl.train", *ARGS, f"data.root={root}", "mode.epochs=2", "hydra.run.dir=run",
         "+callbacks.kill._target_=test_resume.SignalAtTestStart"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HYMTL_CACHE_DIR": str(tmp_path / "cache"),
             "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))},
    )
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted by SIGTERM during the test; training had finished and its checkpoints "
                           f"are saved (best: {tmp_path / 'run' / 'checkpoints'}/best-"), last
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()
