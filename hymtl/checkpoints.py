"""The checkpoints of a run: how they are written, when, what they hold beyond the weights,
and the one a stop leaves.

* :class:`AtomicCheckpointIO` — Lightning's ``TorchCheckpointIO`` writes through an fsspec
  transaction whose temporary file lives in the system temp folder and is *moved* into place;
  when ``/tmp`` is another file system that move is a copy into the final path, so a kill in
  the middle leaves a truncated ``last.ckpt``, and nothing is fsynced. This plugin writes a
  temporary file beside the target, fsyncs it and ``os.replace``-s it: the old checkpoint stays
  whole until the new one is complete. Reading goes through :func:`hymtl.loading.read_checkpoint`:
  a resumed fit and the test of the best checkpoint get the same checks (CRC of every member,
  weights-only) as eval/predict/export.
* :class:`LastCheckpoint` — ``last.ckpt`` at the end of an epoch (what ``ckpt_path=last``
  resumes), at most once per ``min_interval_s`` and always after the fit's last epoch: a
  head-only epoch on cached features takes a tenth of a second, writing the whole model
  several times that.
* :class:`RNGStateCheckpoint` — Lightning checkpoints do not hold the random number generators;
  this callback stores the torch/CUDA/numpy/python states and puts them back when a resumed fit
  starts, so the shuffling and augmentations continue as if never stopped.
* :class:`GracefulStop` — the Lightning side of :mod:`hymtl.signals` (which decides when a run
  stops, and imports no Lightning): inside the fit's epochs and the test's batches a signal
  finishes the batch in progress; in the fit it saves ``interrupted.ckpt``; then
  :class:`~hymtl.signals.RunInterrupted`. ``last.ckpt`` (end of the last saved epoch) is left
  untouched and is what ``ckpt_path=last`` resumes from, exactly.

Which checkpoint a resume reads and whether it may is :mod:`hymtl.resume`'s; where the run
folder is, :mod:`hymtl.runs`'. Used by conf/ (``trainer.plugins``, ``callbacks``).
"""

from __future__ import annotations

import io
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from hymtl.config import checked_number
from hymtl.features import ServesFeatures
from hymtl.fileio import atomic_write_bytes
from hymtl.loading import checked_checkpoint, read_weights_file
from hymtl.runs import CHECKPOINTS_DIR, LAST
from hymtl.signals import RunInterrupted, RunSignals, active_run_signals

INTERRUPTED = "interrupted.ckpt"


# --------------------------------------------------------------------------- atomic writes
class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic: temp file beside the target, fsync,
    ``os.replace``, then fsync of the folder. A SIGKILL at any moment leaves either the old or
    the new checkpoint, never a mix; a stale temp file of a killed write is removed by the next
    successful write of the same checkpoint. Remote URLs (``s3://``…) go to Lightning's code."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options=storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        path = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(path, buffer.getbuffer())
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a write that was killed
            stale.unlink(missing_ok=True)

    def load_checkpoint(self, path, map_location: Any | None = None, weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint, read by :func:`hymtl.loading.read_checkpoint` (the one reader of
        eval/predict/export: every zip member against its CRC, ``weights_only``), on the CPU;
        Lightning moves the states to the device. A damaged file is a one-line ``LoadError``."""
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        loaded = read_weights_file(path)
        if isinstance(loaded, dict) and "state_dict" not in loaded and loaded \
                and all(isinstance(v, torch.Tensor) for v in loaded.values()):
            return loaded  # the bare weights a DDP-spawn worker hands to the main process (Lightning's own file)
        return checked_checkpoint(loaded, path)


# --------------------------------------------------------------------------- the last checkpoint
class LastCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` (conf/callbacks: ``last_checkpoint``, ``filename: last``)
    that skips the save of an epoch ending less than ``min_interval_s`` after its previous save
    (or the start of the fit), except after the fit's last epoch (``max_epochs``, ``max_steps``
    or a requested stop): a run killed without warning loses at most ``min_interval_s`` plus an
    epoch, and a run of short epochs (head-only training on cached features) does not spend
    most of its time writing the whole model. ``0``: every epoch. The decision is rank 0's,
    broadcast, so every DDP rank takes part in the same saves. Step-based saves
    (``every_n_train_steps``, ``train_time_interval``) keep Lightning's own schedule."""

    def __init__(self, *args: Any, min_interval_s: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.min_interval_s = checked_number("callbacks.last_checkpoint.min_interval_s", min_interval_s)
        self._saved_at = time.monotonic()
        self._in_batch_hook = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._saved_at = time.monotonic()

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._in_batch_hook = True  # Lightning asks whether to skip after every batch: no broadcast there
        try:
            super().on_train_batch_end(*args, **kwargs)
        finally:
            self._in_batch_hook = False

    def _should_skip_saving_checkpoint(self, trainer: Trainer) -> bool:
        if super()._should_skip_saving_checkpoint(trainer):
            return True
        if self._in_batch_hook:
            return False
        if self.min_interval_s <= 0 or _last_epoch_of_fit(trainer):
            return False
        recent = time.monotonic() - self._saved_at < self.min_interval_s
        return bool(trainer.strategy.broadcast(recent, src=0))

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self._saved_at = time.monotonic()


def _last_epoch_of_fit(trainer: Trainer) -> bool:
    """Whether the epoch now ending is the fit's last (as far as the limits tell)."""
    if trainer.should_stop:
        return True
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    if max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs:
        return True
    return max_steps is not None and max_steps > 0 and trainer.global_step >= max_steps


# --------------------------------------------------------------------------- RNG state
class RNGStateCheckpoint(Callback):
    """Saves the global RNG states with every checkpoint and restores them on resume.

    Saved when Lightning writes the end-of-epoch checkpoint (``on_train_epoch_end``), after which
    the uninterrupted run draws nothing until the next epoch's ``iter(train_dataloader)`` (the
    shuffling, the worker seeds, then the augmentations). A resumed run creates that iterator
    in ``FitLoop.setup_data``, right after ``on_fit_start`` and before ``on_train_epoch_start``,
    so the states are put back in ``on_fit_start``. States are plain tensors/ints (``weights_only``).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
            "python": _python_state_to_plain(random.getstate()),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        np_state = state["numpy"]
        np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                             np_state["has_gauss"], np_state["cached_gaussian"]))
        random.setstate(_python_state_from_plain(state["python"]))
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_plain(state: tuple) -> dict[str, Any]:
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _python_state_from_plain(state: dict[str, Any]) -> tuple:
    return state["version"], tuple(int(v) for v in state["internal"].tolist()), state["gauss"]


# --------------------------------------------------------------------------- a graceful stop
class GracefulStop(Callback):
    """SIGINT/SIGTERM inside the batch loops: finish the batch in progress; in the fit save
    ``<dirpath>/interrupted.ckpt`` (the state at that batch: weights for evaluation, or a
    mid-epoch resume Lightning cannot replay exactly); then stop with :class:`RunInterrupted`.
    A second Ctrl-C stops at once.

    The fit defers from ``on_train_start`` to ``on_train_end`` (every epoch, its validation and
    checkpoints), the test during each batch. Outside those — the fit's setup with its feature
    extraction, the test's setup, the figures and metrics.json after the last test batch — a
    signal stops at once (:class:`RunSignals`): the run-wide handler of ``hymtl.train``, or one
    this callback installs from ``setup`` to ``teardown`` when the Trainer is used alone."""

    def __init__(self, dirpath: str | None = None, filename: str = INTERRUPTED) -> None:
        self.dirpath = dirpath
        self.filename = filename
        self.signum: int | None = None
        self._signals: RunSignals | None = None
        self._own: RunSignals | None = None

    # -- phases ------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.signum = None
        self._signals = active_run_signals()
        if self._signals is None:  # the Trainer used on its own: a handler for this fit/test only
            self._own = self._signals = RunSignals(_checkpoint_dir(trainer)).__enter__()
        self._signals.install()
        if stage == "fit":
            data = trainer.datamodule
            extracting = isinstance(data, ServesFeatures) and data.serves_features("fit")
            self._signals.phase = "the feature extraction" if extracting else "the setup of the fit"
        elif stage == "test":
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            self._signals.best = best or self._signals.best
            self._signals.phase = "test"

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Lightning has put its SIGTERM handler over ours by now; inside the loops it would raise
        # SIGTERMException, a SystemExit with code 0, at the next batch: take the signal back
        self._signals.install()
        self._signals.phase = "the fit"
        self._signals.defer_to(self)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._signals.defer_to(None)
        self._signals.phase = "the end of the fit"
        self._stop_if_asked(trainer)  # a signal after the last batch: every epoch is saved

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._signals.install()  # over Lightning's handler, as in on_train_start

    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        self._signals.defer_to(self)

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        self._signals.defer_to(None)
        if self.signum is not None:
            if self._signals.outcome is not None:  # eval: the entry point says what a stop leaves
                raise self._signals.interruption(self.signum)
            raise RunInterrupted(self.signum, self._signals.best, _last_checkpoint(trainer), trainer.current_epoch, "test")
        if trainer.test_loop.batch_progress.is_last_batch:
            self._signals.phase = "results"  # the figures and metrics.json follow

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._signals is not None:
            self._signals.defer_to(None)
        if self._own is not None:
            self._own.__exit__(None, None, None)
        self._own = self._signals = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "")  # Lightning calls no teardown hooks after an exception

    # -- the deferred stop ---------------------------------------------------------------
    def request(self, signum: int) -> None:
        """A signal inside the batch loops: stop after the batch in progress."""
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: do not wait for the batch
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after the batch in progress (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        self._stop_if_asked(trainer)

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        if not trainer.sanity_checking:
            self._stop_if_asked(trainer)

    def _stop_if_asked(self, trainer: Trainer) -> None:
        if self.signum is None:
            return
        folder = Path(self.dirpath) if self.dirpath else _checkpoint_dir(trainer)
        path = folder / self.filename
        trainer.save_checkpoint(path)
        raise RunInterrupted(self.signum, str(path), _last_checkpoint(trainer), trainer.current_epoch)


def _last_checkpoint(trainer: Trainer) -> str | None:
    """The ``last.ckpt`` this run wrote (end of its last saved epoch), whichever checkpoint
    callback writes it (``save_last`` of one, or one that writes only ``last``), else ``None``."""
    for callback in trainer.checkpoint_callbacks:
        for attribute in ("last_model_path", "best_model_path"):
            path = getattr(callback, attribute, "") or ""
            if path and Path(path).name == LAST and os.path.isfile(path):
                return path
    return None


def _checkpoint_dir(trainer: Trainer) -> Path:
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return Path(callback.dirpath)
    return Path(trainer.default_root_dir) / CHECKPOINTS_DIR
