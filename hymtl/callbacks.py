"""Callbacks: throughput and the tutorial's summary lines.

The two-phase freeze/unfreeze schedule is driven by ``TransferModule`` itself from
``trainer.current_epoch`` (see ``hymtl/model.py`` for why that is resume- and DDP-safe).
"""

from __future__ import annotations

import time

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only


class ThroughputMonitor(Callback):
    """Counts training examples and the seconds spent in training batches (validation excluded).

    ``examples_per_sec`` is the tutorial's figure: training examples processed per second of
    training, over the whole fit, summed over devices.
    """

    def __init__(self) -> None:
        self.examples = 0
        self.seconds = 0.0
        self._epoch_started: float | None = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        labels = batch[-1]
        self.examples += int(labels.shape[0]) * trainer.world_size

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pause()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.training and not trainer.sanity_checking:
            self._epoch_started = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._pause()

    def _pause(self) -> None:
        if self._epoch_started is not None:
            self.seconds += time.perf_counter() - self._epoch_started
            self._epoch_started = None

    @property
    def examples_per_sec(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


def tutorial_lines(train_loss: float, train_acc: float, test_acc: float, examples_per_sec: float, device: str) -> str:
    """The classic tutorial's two closing lines."""
    return (
        f"loss {train_loss:.3f}, train acc {train_acc:.3f}, test acc {test_acc:.3f}\n"
        f"{examples_per_sec:.1f} examples/sec on {device}"
    )


@rank_zero_only
def print_tutorial_lines(*args, **kwargs) -> None:
    print(tutorial_lines(*args, **kwargs), flush=True)
