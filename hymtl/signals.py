"""Stopping on SIGINT/SIGTERM, the same way in every entry point: exit 128 + the signal (130,
143) with one line saying what was and was not written.

* :class:`RunSignals` — installs the handlers for the whole of a task (``hymtl.train`` around its
  run; :func:`hymtl.cli.run_entry` around eval/predict/export, given what a stop leaves there);
  outside the batch loops a signal raises :class:`RunInterrupted` at once, from wherever the
  main thread is: safe, because every file hymtl writes is written atomically (whole or absent)
  and scratch folders are context managers that go on the way out.
* :class:`RunInterrupted` — the ``BaseException`` that carries the line; ``run_entry`` prints it
  and exits with its code. Inside a fit's batches, :class:`hymtl.checkpoints.GracefulStop` finishes
  the batch and saves first.

Imports no torch or Lightning: a light entry point (predict) pays nothing for it.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any, Protocol

from hymtl.runs import LAST


class DeferredStop(Protocol):
    """What a stop can be handed to while a batch runs (:class:`hymtl.checkpoints.GracefulStop`:
    it finishes the batch, saves, then raises :class:`RunInterrupted`)."""

    def request(self, signum: int) -> None: ...


class RunInterrupted(BaseException):
    """The run stopped on SIGINT/SIGTERM after saving its state. A ``BaseException`` so that a
    sweep's per-run ``except Exception`` does not swallow the user's Ctrl-C.

    ``stage``: ``"fit"`` (in an epoch: ``checkpoint`` is ``interrupted.ckpt``), ``"test"``
    (training had finished, ``checkpoint`` is the best one), ``"results"`` (the test had
    finished; figures and metrics.json were being written), else the phase outside the batch
    loops it stopped in, in words (``"the file scan"``, ``"the feature extraction"``…).
    """

    def __init__(self, signum: int, checkpoint: str | None, resume_from: str | None, epoch: int,
                 stage: str = "fit", outcome: str | None = None):
        self.outcome = outcome  # an entry point's own account of what a stop leaves (not a training run)
        self.signum = signum
        self.checkpoint = checkpoint
        self.resume_from = resume_from
        self.epoch = epoch
        self.stage = stage
        super().__init__(self.message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM

    @property
    def message(self) -> str:
        name = signal.Signals(self.signum).name
        if self.outcome is not None:
            return f"interrupted by {name} during {self.stage}; {self.outcome}"
        best = f" (best: {self.checkpoint})" if self.checkpoint else ""
        test_it = "test it with python -m hymtl.eval ckpt_path=<the checkpoint>"
        if self.stage == "test":
            return (f"interrupted by {name} during the test; training had finished and its checkpoints are saved"
                    f"{best}; no metrics.json was written: {test_it}")
        if self.stage == "results":
            return (f"interrupted by {name} while writing the results (figures, metrics.json); training and the test "
                    f"had finished and the checkpoints are saved{best}; each result file is written whole or not at "
                    f"all: where metrics.json is missing, {test_it}")
        if self.stage == "fit":
            where = f"in epoch {self.epoch}; state saved in {self.checkpoint}" if self.checkpoint else f"in epoch {self.epoch}"
        else:
            where = f"during {self.stage}"
        if self.resume_from:
            resume = (f"; resume with ckpt_path=last (or ckpt_path={self.resume_from}): it continues from the "
                      f"end of the last saved epoch and ends as an uninterrupted run would")
        elif self.stage == "fit" and self.epoch > 0:  # epochs ended, none was due a last.ckpt (LastCheckpoint)
            resume = ("; no epoch-end checkpoint was due yet (callbacks.last_checkpoint.min_interval_s), so there is "
                      "nothing to resume from: a new run starts from scratch")
        else:
            resume = "; no epoch had finished, so nothing of the run is saved: a new run starts from scratch"
            if self.stage == "the feature extraction":
                resume += " (the feature cache keeps the features computed so far)"
        return f"interrupted by {name} {where}{resume}"


_ACTIVE: "RunSignals | None" = None  # the run-wide handler of this process, while a run is under way


class RunSignals:
    """SIGINT/SIGTERM for a whole run: ``with RunSignals(checkpoints_dir) as signals: ...``.

    Outside the batch loops a signal raises :class:`RunInterrupted` at once, from wherever the
    main thread is (the file scan, the feature extraction, between fit and test, the figures,
    metrics.json): safe because every file of a run (checkpoints, feature-cache entries,
    metrics.json, skipped.txt) is written atomically, so a stop leaves each whole or absent.
    Inside them (:meth:`defer_to`, set by :class:`GracefulStop`) the batch in progress finishes.
    ``phase`` (in words; set by the entry point and :class:`GracefulStop`) says where a stop happened; ``best`` is the best
    checkpoint once the fit has ended. ``outcome``: for a task that is no training run, what a
    stop leaves, in words (the line becomes ``interrupted by SIGTERM during <phase>; <outcome>``).
    Handlers are installed from the main thread only."""

    def __init__(self, checkpoints_dir: str | os.PathLike | None = None, outcome: str | None = None,
                 phase: str = "the start of the run") -> None:
        self.checkpoints_dir = Path(checkpoints_dir) if checkpoints_dir else None
        self.outcome = outcome
        self.phase = phase
        self.best: str | None = None
        self._deferred_to: DeferredStop | None = None
        self._previous: dict[int, Any] = {}
        self._outer: RunSignals | None = None

    def __enter__(self) -> "RunSignals":
        global _ACTIVE
        self._outer, _ACTIVE = _ACTIVE, self
        self.install()
        return self

    def __exit__(self, *exc_info) -> None:
        global _ACTIVE
        for signum, handler in self._previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        self._previous = {}
        _ACTIVE, self._outer = self._outer, None

    def install(self) -> None:
        """(Re)install the handler: Lightning puts its own on SIGTERM when a fit or test starts."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous.setdefault(signum, signal.getsignal(signum))
            signal.signal(signum, self._handle)

    def defer_to(self, stop: DeferredStop | None) -> None:
        """Inside the batch loops: let ``stop`` finish the batch (``None``: stop at once again)."""
        self._deferred_to = stop

    def _handle(self, signum: int, frame) -> None:
        if self._deferred_to is not None:
            self._deferred_to.request(signum)
            return
        raise self.interruption(signum)

    def interruption(self, signum: int) -> RunInterrupted:
        """The :class:`RunInterrupted` of a stop in the current phase, saying what is on disk
        (``outcome``, when the task is no training run: what eval/predict/export leave)."""
        if self.outcome is not None:
            return RunInterrupted(signum, None, None, -1, self.phase, outcome=self.outcome)
        if self.phase in ("test", "results"):
            return RunInterrupted(signum, self.best, None, -1, self.phase)
        last = self.checkpoints_dir / LAST if self.checkpoints_dir is not None else None
        resume_from = str(last) if last is not None and last.is_file() else None
        return RunInterrupted(signum, None, resume_from, -1, self.phase)


def active_run_signals() -> RunSignals | None:
    """The run-wide handler of the run under way in this process, if any."""
    return _ACTIVE
