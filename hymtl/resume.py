"""Runs that survive interruption: atomic checkpoints, RNG state, a clean stop on signals, resume.

* :class:`AtomicCheckpointIO` — Lightning's ``TorchCheckpointIO`` writes through an fsspec
  transaction whose temporary file lives in the system temp folder and is *moved* into place;
  when ``/tmp`` is another file system that move is a copy into the final path, so a kill in
  the middle leaves a truncated ``last.ckpt``, and nothing is fsynced. This plugin writes a
  temporary file beside the target, fsyncs it and ``os.replace``-s it: the old checkpoint stays
  whole until the new one is complete.
* :class:`RNGStateCheckpoint` — Lightning checkpoints do not hold the random number generators;
  this callback stores the torch/CUDA/numpy/python states and puts them back when a resumed fit
  starts, so the shuffling and augmentations continue as if never stopped.
* :class:`GracefulStop` — SIGINT (Ctrl-C) and SIGTERM finish the batch in progress, save
  ``interrupted.ckpt`` and stop with :class:`RunInterrupted`; ``last.ckpt`` (end of the last
  whole epoch) is left untouched and is what ``ckpt_path=last`` resumes from, exactly.
* :func:`resolve_resume` — what ``ckpt_path=last`` / a path means, and which run folder a
  resumed run continues in (the run of a checkpoint is :func:`hymtl.runs.run_dir_of`).

Imports only downward (errors, fileio, runs); used by the entry points and conf/.
"""

from __future__ import annotations

import io
import logging
import os
import random
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer

from hymtl.errors import HymtlError
from hymtl.fileio import atomic_write_bytes
from hymtl.runs import CHECKPOINTS_DIR, run_dir_of

log = logging.getLogger(__name__)

LAST = "last.ckpt"
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


# --------------------------------------------------------------------------- signals
class RunInterrupted(BaseException):
    """The run stopped on SIGINT/SIGTERM after saving its state. A ``BaseException`` so that a
    sweep's per-run ``except Exception`` does not swallow the user's Ctrl-C."""

    def __init__(self, signum: int, checkpoint: str | None, resume_from: str | None, epoch: int,
                 stage: str = "fit"):
        self.signum = signum
        self.checkpoint = checkpoint
        self.resume_from = resume_from
        self.epoch = epoch
        self.stage = stage  # "fit", or "test": training had finished, its checkpoints are on disk
        super().__init__(self.message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM

    @property
    def message(self) -> str:
        name = signal.Signals(self.signum).name
        if self.stage == "test":
            saved = f"; training had finished and its checkpoints are saved (best: {self.checkpoint})" \
                if self.checkpoint else "; training had finished"
            return (f"interrupted by {name} during the test{saved}; no metrics.json was written: "
                    "test it with python -m hymtl.eval ckpt_path=<the checkpoint>")
        where = f"; state saved in {self.checkpoint}" if self.checkpoint else ""
        if self.resume_from:
            resume = (f"; resume with ckpt_path=last (or ckpt_path={self.resume_from}): it continues from the "
                      f"end of the last whole epoch and ends as an uninterrupted run would")
        else:
            resume = "; no epoch had finished, so a new run starts from scratch"
        return f"interrupted by {name} in epoch {self.epoch}{where}{resume}"


class GracefulStop(Callback):
    """SIGINT/SIGTERM: finish the batch in progress, save ``<dirpath>/interrupted.ckpt`` (the
    state at that batch: weights for evaluation, or a mid-epoch resume Lightning cannot replay
    exactly), then stop with :class:`RunInterrupted`. A second Ctrl-C stops at once."""

    def __init__(self, dirpath: str | None = None, filename: str = INTERRUPTED) -> None:
        self.dirpath = dirpath
        self.filename = filename
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._install()

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # every phase stops on a signal with a non-zero code (Lightning's own handler exits 0 here)
        self._install()

    def _install(self) -> None:
        self.signum = None
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame) -> None:
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

    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        if self.signum is not None:
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            raise RunInterrupted(self.signum, best or None, _last_checkpoint(trainer), trainer.current_epoch, "test")

    def _stop_if_asked(self, trainer: Trainer) -> None:
        if self.signum is None:
            return
        folder = Path(self.dirpath) if self.dirpath else _checkpoint_dir(trainer)
        path = folder / self.filename
        trainer.save_checkpoint(path)
        raise RunInterrupted(self.signum, str(path), _last_checkpoint(trainer), trainer.current_epoch)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}


def _last_checkpoint(trainer: Trainer) -> str | None:
    """The ``last.ckpt`` this run wrote (end of its last whole epoch), whichever checkpoint
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


# --------------------------------------------------------------------------- resume
@dataclass(frozen=True)
class Resume:
    """A resolved ``ckpt_path``: the checkpoint, and the run folder the resumed run writes to
    (``None``: the new Hydra run folder)."""

    checkpoint: Path
    run_dir: Path | None


def resolve_resume(ckpt_path: str | None, output_dir: Path, log_dir: Path) -> Resume | None:
    """``ckpt_path`` -> :class:`Resume`.

    * ``None``: a new run.
    * ``last``: ``<output_dir>/checkpoints/last.ckpt`` when this run folder has one (the command
      reused ``hydra.run.dir``), else the newest ``last.ckpt`` (by modification time) of the
      single runs under ``log_dir`` (``outputs/<date>/<time>/checkpoints/``). Sweeps are not
      searched: several of their runs are "the newest"; pass their path.
    * a path: that file.

    A checkpoint inside a run folder resumes *in* that folder, so its checkpoints (the best
    model so far), TensorBoard curves and metrics.json stay one run.
    """
    if ckpt_path is None or str(ckpt_path).strip() == "":
        return None
    if str(ckpt_path) == "last":
        own = output_dir / CHECKPOINTS_DIR / LAST
        if own.is_file():
            return Resume(own, output_dir)
        candidates = [p for p in log_dir.glob(f"*/*/{CHECKPOINTS_DIR}/{LAST}") if p.is_file()]
        candidates = [p for p in candidates if "multirun" not in p.relative_to(log_dir).parts]
        if not candidates:
            raise HymtlError(f"ckpt_path=last: no {LAST} under {log_dir}/<date>/<time>/checkpoints/ to resume from "
                             f"(pass ckpt_path=PATH, or hydra.run.dir=<the run folder>)")
        newest = max(candidates, key=lambda p: p.stat().st_mtime)
        return Resume(newest, run_dir_of(newest))
    path = Path(os.path.expanduser(str(ckpt_path)))
    if not path.is_file():
        raise HymtlError(f"ckpt_path: no checkpoint file at {path}")
    return Resume(path, run_dir_of(path))


def check_resumable(path: Path, backbone: str, class_names: list[str], unfreeze_at_epoch: Any) -> None:
    """One clear line instead of a shape-mismatch traceback when the checkpoint is of another
    model, dataset or regime (read with ``weights_only=True``: no code runs)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or tampered: one line
        raise HymtlError(f"cannot resume from {path}: not a readable checkpoint ({type(exc).__name__})") from None
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    mismatches = []
    for key, want in (("backbone", backbone), ("class_names", list(class_names)),
                      ("unfreeze_at_epoch", unfreeze_at_epoch)):
        if key in hp and hp[key] != want:
            mismatches.append(f"{key} {hp[key]!r} (this run: {want!r})")
    if mismatches:
        raise HymtlError(f"cannot resume from {path}: it was trained with " + ", ".join(mismatches))
