"""What :func:`~hymtl.tutorial.train_fine_tuning` measures per epoch, and the curve it draws
(live in a notebook)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch import Callback
from matplotlib.figure import Figure

from hymtl.callbacks import tutorial_lines
from hymtl.figures import epoch_curves


@dataclass
class History:
    """What :func:`~hymtl.tutorial.train_fine_tuning` measured, one value per epoch (``test_acc``: the
    ``test_iter`` accuracy at the end of each epoch)."""

    train_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    examples_per_sec: float = 0.0
    device: str = "cpu"
    curve_path: Path | None = None
    figure: Figure | None = None

    @property
    def epochs(self) -> int:
        return len(self.train_loss)

    def lines(self) -> str:
        """The tutorial's two lines for the last epoch."""
        return tutorial_lines(self.train_loss[-1], self.train_acc[-1], self.test_acc[-1], self.examples_per_sec, self.device)

    def series(self) -> dict[str, list[float]]:
        return {"train loss": self.train_loss, "train acc": self.train_acc, "test acc": self.test_acc}


def in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (where the curve is drawn live)."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class EpochCurve(Callback):
    """Records train loss / train acc / test acc after every epoch and redraws the curve
    (live in a notebook). It reads ``trainer.callback_metrics`` when the *next* epoch starts
    (or training ends): callbacks' ``on_train_epoch_end`` runs before the module logs the
    epoch's train metrics."""

    def __init__(self, history: History, title: str | None, live: bool):
        self.history = history
        self.title = title
        self.live = live
        self._pending = False
        self._display = None

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._pending = True

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._record(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        self._record(trainer)

    def _record(self, trainer) -> None:
        if not self._pending:
            return
        self._pending = False
        metrics = trainer.callback_metrics

        def value(key: str) -> float:
            return float(metrics[key]) if key in metrics else math.nan

        self.history.train_loss.append(value("train/loss"))
        self.history.train_acc.append(value("train/acc"))
        self.history.test_acc.append(value("val/acc"))
        if self.live:
            from IPython.display import display

            figure = epoch_curves(self.history.series(), title=self.title)
            if self._display is None:
                self._display = display(figure, display_id=True)
            else:
                self._display.update(figure)
