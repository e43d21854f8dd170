"""Resuming a run that trains on cached backbone features is exact (issue 12, item 5).

With the defaults (``feature_cache.precompute`` on: ``mode=two_phase`` serves features for its
head-only epochs, ``mode=frozen`` for the whole run), a run killed with SIGKILL right after an
epoch's checkpoint and resumed with ``ckpt_path`` must log, epoch by epoch, exactly the train
and val losses of an uninterrupted run of the same seed. The reference run computes the
features; the killed and the resumed runs read them from the cache it filled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import SMALL_VIEWS, entry_command, make_image_folder
from hymtl.runs import LAST

TESTS = Path(__file__).parent
ARGS = [
    "model=efficientnet_lite0", "model.pretrained=false", "data=folder", "data.num_workers=0", "data.batch_size=4",
    "callbacks.test_figures=null", "trainer.precision=32-true", "+trainer.limit_test_batches=1",
    SMALL_VIEWS,  # exactness is checked on 64 px views as well as on 224: a fraction of the backbone's work
]
MODES = {
    # unfreeze at epoch 2: the resumed run must switch from features to images at the same epoch
    "two_phase": ["mode=two_phase", "mode.freeze_epochs=2", "mode.epochs=3"],
    "frozen": ["mode=frozen", "mode.epochs=3", "mode.feature_views=2"],
}
# with DataLoader workers (the default is one per core): the augmentations of image epochs come
# from the workers' random streams, which a resumed run must continue exactly as well
WORKER_CASES = {
    # killed before epoch 1: the resumed run's workers must draw what the reference's draw in epoch 1
    "finetune": ["mode=finetune", "mode.epochs=3"],
    # killed before epoch 3, the second image epoch: the reference's workers started at epoch 2
    "two_phase": ["mode=two_phase", "mode.freeze_epochs=2", "mode.epochs=4"],
}
COMPARED = ("train/loss", "train/acc", "val/acc", "val/loss", "val/acc_best", "test/acc", "test/loss", "epochs")


class KillAtEpochStart:
    """A callback (``+callbacks.kill._target_=test_resume_features.KillAtEpochStart
    +callbacks.kill.epoch=N``) that SIGKILLs its own process as epoch ``N`` starts: the end of
    epoch ``N - 1`` is then on disk (``last.ckpt``) and nothing of epoch ``N`` is."""

    def __new__(cls, epoch: int):
        from lightning.pytorch.callbacks import Callback

        class _Kill(Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                if trainer.current_epoch == int(epoch):
                    os.kill(os.getpid(), signal.SIGKILL)

        return _Kill()


def _train(cwd: Path, mode: str, *overrides: str, workers: int = 0) -> subprocess.CompletedProcess:
    """``hymtl.train`` in ``cwd`` with ``workers`` DataLoader workers; ``mode``: a key of
    :data:`MODES` or, with workers, of :data:`WORKER_CASES`."""
    env = {**os.environ, "HYMTL_CACHE_DIR": str(cwd / "cache"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    args = [a if a != "data.num_workers=0" else f"data.num_workers={workers}" for a in ARGS]
    mode_args = WORKER_CASES[mode] if workers else MODES[mode]
    return subprocess.run([*entry_command("hymtl.train"), *args, *mode_args, *overrides], cwd=cwd,
                          capture_output=True, text=True, timeout=1800, env=env)


def _epoch_losses(run: Path) -> dict[str, dict[int, float]]:
    """The per-epoch ``train/loss`` and ``val/loss`` logged to TensorBoard, by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses: dict[str, dict[int, float]] = {"train/loss": {}, "val/loss": {}}
    for events in sorted((run / "tensorboard").glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in losses:
            if tag in acc.Tags()["scalars"]:
                losses[tag].update({e.step: e.value for e in acc.Scalars(tag)})
    return losses


def _reference_runs(tmp_path_factory, name: str, workers: int):
    """``(reference, done)``: ``reference(mode)`` trains one uninterrupted run per mode (lazily) in a
    folder the killed and resumed runs share; ``done`` maps each mode to its run folder."""
    root = tmp_path_factory.mktemp(name)
    data = make_image_folder(root / "data", per_class=4)
    done: dict[str, Path] = {}

    def reference(mode: str) -> tuple[Path, Path]:
        if mode not in done:
            result = _train(root, mode, f"data.root={data}", f"hydra.run.dir=ref_{mode}", workers=workers)
            assert result.returncode == 0, result.stderr[-3000:]
            done[mode] = root / f"ref_{mode}"
        return root, data

    return reference, done


def _kill_resume_and_compare(references, mode: str, kill_at: int, epochs: int, workers: int = 0) -> str:
    """SIGKILL a run of ``mode`` as epoch ``kill_at`` starts, resume it from ``last.ckpt`` and
    require the reference's losses (exact floats, every epoch) and metrics; the killed run's output."""
    reference, done = references
    root, data = reference(mode)
    run = f"run_{mode}_{kill_at}"
    killed = _train(root, mode, f"data.root={data}", f"hydra.run.dir={run}",
                    "+callbacks.kill._target_=test_resume_features.KillAtEpochStart", f"+callbacks.kill.epoch={kill_at}",
                    "callbacks.last_checkpoint.min_interval_s=0",  # the end of every epoch on disk: resume at kill_at
                    workers=workers)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = root / run / "checkpoints" / LAST
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == kill_at - 1

    resumed = _train(root, mode, f"data.root={data}", f"hydra.run.dir={run}_resume", f"ckpt_path={last}",
                     workers=workers)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = _epoch_losses(done[mode]), _epoch_losses(root / run)
    assert len(want["train/loss"]) == len(want["val/loss"]) == epochs
    assert got == want, (kill_at, got, want)  # exact floats, every epoch
    ref = json.loads((done[mode] / "metrics.json").read_text())
    metrics = json.loads((root / run / "metrics.json").read_text())
    for key in COMPARED:
        assert metrics[key] == ref[key], (key, metrics[key], ref[key])
    return killed.stderr + killed.stdout


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One uninterrupted run per mode of :data:`MODES`, without DataLoader workers."""
    return _reference_runs(tmp_path_factory, "resume_features", workers=0)


@pytest.mark.slow
@pytest.mark.parametrize("mode, kill_at", [("two_phase", 1), ("two_phase", 2), ("frozen", 1)],
                         ids=["two_phase-head_only_epoch", "two_phase-switch_epoch", "frozen"])
def test_a_run_on_cached_features_killed_and_resumed_logs_the_losses_of_an_uninterrupted_run(
        references, mode, kill_at):
    output = _kill_resume_and_compare(references, mode, kill_at, epochs=3)
    assert "cache hits" in output  # the killed run read the reference's features


@pytest.fixture(scope="module")
def worker_references(tmp_path_factory):
    """One uninterrupted run per :data:`WORKER_CASES` entry with one DataLoader worker."""
    return _reference_runs(tmp_path_factory, "resume_workers", workers=1)


@pytest.mark.slow
@pytest.mark.parametrize("case, kill_at, epochs", [("finetune", 1, 3), ("two_phase", 3, 4)],
                         ids=["finetune", "two_phase-second_image_epoch"])
def test_a_run_with_dataloader_workers_killed_and_resumed_logs_the_losses_of_an_uninterrupted_run(
        worker_references, case, kill_at, epochs):
    _kill_resume_and_compare(worker_references, case, kill_at, epochs, workers=1)
