"""Callbacks: throughput, the per-epoch lines, the tutorial's summary lines, test-time figures
and reports, hp_metric, and the run summary (``metrics.json`` and the end of the run's output):
each publishes its own results.

The two-phase freeze/unfreeze schedule is driven by ``TransferModule`` itself from
``trainer.current_epoch`` (see ``hymtl/model.py`` for why that is resume- and DDP-safe).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping as LightningEarlyStopping
from torchmetrics import Metric

from hymtl import loggers as run_loggers
from hymtl.fileio import shown_path
from hymtl.errors import HymtlError, first_line
from hymtl.features import FeatureBatch, ServesFeatures
from hymtl.figures import (ClassSpreadSample, confused_pairs, confusion_matrix_figure, label_counts_figure,
                           most_wrong_grid, multilabel_grid, png_bytes, pr_curves_figure,
                           prediction_grid, render)
from hymtl.fileio import atomic_write_bytes, atomic_write_json
from hymtl.progress import on_terminal
from hymtl.data.splits import IMBALANCE_RATIO
from hymtl.tasks import make_task
from hymtl.runtime import device_name
from hymtl.config import checked_number

log = logging.getLogger("hymtl.callbacks")


class ExamplesPerSecond(Callback):
    """Counts training examples and the seconds spent in training batches (validation excluded).

    ``examples_per_sec`` is the tutorial's figure: training examples processed per second of
    training, over the whole fit, summed over devices. Published as the logged metric
    ``train/examples_per_sec`` at every epoch's end (what :class:`RunSummary` reports).

    Not Lightning's ``ThroughputMonitor``: that one reports per-step rates over a sliding window
    (and needs a batch-size function); the tutorial's line is one figure for the whole fit.
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
        # also a logged metric: the figure a DDP-spawn run (multirun) returns to the main
        # process, where this callback's own counters stay empty (mean over the ranks' clocks)
        pl_module.log("train/examples_per_sec", self.examples_per_sec, sync_dist=True)

    def _pause(self) -> None:
        if self._epoch_started is not None:
            self.seconds += time.perf_counter() - self._epoch_started
            self._epoch_started = None

    @property
    def examples_per_sec(self) -> float:
        return self.examples / self.seconds if self.seconds > 0 else 0.0


def epoch_metrics(metric: str = "acc") -> tuple[str, ...]:
    """The numbers of :class:`EpochLines`, in line order, for the task's ``metric``."""
    return ("train/loss", f"train/{metric}", "val/loss", f"val/{metric}")


#: the epoch metrics of a multi-class run (:func:`epoch_metrics`)
EPOCH_METRICS = epoch_metrics()

#: ``extra=`` of a log record that goes to the log file only (``hymtl.cli.QuietConsole``)
FILE_ONLY = {"console": False}


class EpochLines(Callback):
    """One line per training epoch: its index, ``train/loss``, ``train/acc``, ``val/loss``,
    ``val/acc`` and duration. Always in the log (``train.log``); on the console where no
    progress bar shows them: on a terminal Lightning's bar is the view, elsewhere (CI, a pipe,
    a log) the bar's carriage returns are noise, so it is switched off and these lines replace it.

    ``bar``: ``None`` (a bar on a terminal), ``True`` or ``False``. ``echo``: print the lines
    instead of logging them (``hymtl.tutorial``, which has no log file).

    The line is written when the epoch's numbers are all known: the module logs ``train/*`` in
    its own ``on_train_epoch_end``, after the callbacks' (so at the next epoch's start or at
    the end of training).
    """

    def __init__(self, bar: bool | None = None, echo: bool = False) -> None:
        self.bar = bar
        self.echo = bool(echo)
        self._started: float | None = None
        self._pending: tuple[int, float] | None = None  # (epoch, seconds) of a finished epoch

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and not (on_terminal() if self.bar is None else self.bar):
            bar = trainer.progress_bar_callback
            if bar is not None:
                bar.disable()

    def _bar_shown(self, trainer: Trainer) -> bool:
        bar = trainer.progress_bar_callback
        return bar is not None and bar.is_enabled

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._started is not None:
            self._pending = (trainer.current_epoch, time.perf_counter() - self._started)
            self._started = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)

    def _write(self, trainer: Trainer) -> None:
        pending, self._pending = self._pending, None
        if pending is None or not trainer.is_global_zero:
            return
        epoch, seconds = pending
        task = getattr(trainer.lightning_module, "task", None)
        keys = epoch_metrics(task.metric) if task is not None else EPOCH_METRICS
        line = epoch_line(epoch, trainer.max_epochs, trainer.callback_metrics, seconds, keys)
        if self.echo:
            print(line, flush=True)
        else:
            log.info("%s", line, extra=FILE_ONLY if self._bar_shown(trainer) else {})


def epoch_line(epoch: int, max_epochs: int | None, metrics: Mapping[str, Any], seconds: float,
               keys: Sequence[str] = EPOCH_METRICS) -> str:
    """``epoch 0 (1 of 5): train/loss 0.6931, train/acc 0.5000, val/loss …, val/acc … in 3.2 s``."""
    of = f" ({epoch + 1} of {max_epochs})" if max_epochs is not None and max_epochs > 0 else ""
    values = ", ".join(f"{k} {float(metrics[k]):.4f}" for k in keys if k in metrics)
    return f"epoch {epoch}{of}: {values or 'no metrics'} in {seconds:.1f} s"


def tutorial_lines(train_loss: float, train_acc: float, test_acc: float, examples_per_sec: float, device: str) -> str:
    """The classic tutorial's two closing lines."""
    return (
        f"loss {train_loss:.3f}, train acc {train_acc:.3f}, test acc {test_acc:.3f}\n"
        f"{examples_per_sec:.1f} examples/sec on {device}"
    )


# --------------------------------------------------------------------------- test-time outputs
class _TestOutputsTap(Callback):
    """Sees every test batch's logits without a second forward pass and without asking the
    module to return them: a forward hook on the LightningModule records the output of the
    ``self(images)`` call inside ``test_step``; ``on_test_batch_end`` pairs it with the batch.
    """

    def __init__(self) -> None:
        self._handle = None
        self._logits: torch.Tensor | None = None

    def _record(self, module, args, output) -> None:
        self._logits = output

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._handle = pl_module.register_forward_hook(self._record)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        logits, self._logits = self._logits, None
        if logits is None:
            return
        images, labels = batch[0], batch[-1]
        self.on_test_predictions(trainer, pl_module, images, logits.detach().float(), labels)

    def on_test_predictions(self, trainer, pl_module, images: torch.Tensor, logits: torch.Tensor,
                            labels: torch.Tensor) -> None:
        """One test batch: its (normalised) images, logits ``(N, C)`` and true labels."""
        raise NotImplementedError


def _class_names(pl_module: LightningModule) -> list[str]:
    names = getattr(pl_module, "class_names", None)
    return list(names) if names else [str(i) for i in range(pl_module.hparams.num_classes)]


def _normalisation(pl_module: LightningModule) -> dict[str, Any]:
    pre = getattr(pl_module, "preprocessing", None)
    return {"mean": pre.mean, "std": pre.std} if pre is not None else {}


class ConfusionCounts(Metric):
    """The confusion matrix ``(C, C)`` (rows: true class, columns: the logits' argmax), summed
    over devices when computed. Each batch costs what its size costs: torchmetrics' own
    confusion matrix and per-class scores count with a ``C * C`` bincount per batch and metric,
    a third of a second per batch for 1000 classes; here, one accumulate of the batch's pairs."""

    full_state_update = False

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.add_state("matrix", default=torch.zeros(self.num_classes, self.num_classes, dtype=torch.long),
                       dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.long().to(self.matrix.device)
        predicted = logits.argmax(dim=-1).to(self.matrix.device)
        self.matrix.index_put_((labels, predicted), torch.ones_like(labels), accumulate=True)

    def compute(self) -> torch.Tensor:
        return self.matrix


class MultilabelOutputs(Metric):
    """The test split's label probabilities ``(N, C)`` and 0/1 targets, concatenated over
    batches and devices: what per-label counts at any threshold, precision-recall curves and
    average precision are computed from (``N * C`` floats: a few MB for 10,000 images x 100 labels)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")

    def update(self, probs: torch.Tensor, targets: torch.Tensor) -> None:
        self.probs.append(probs.float())
        self.targets.append(targets.float())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.cat(self.probs) if isinstance(self.probs, list) else self.probs
        targets = torch.cat(self.targets) if isinstance(self.targets, list) else self.targets
        return probs, targets


def multilabel_scores(probs: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor,
                      class_names: Sequence[str]) -> dict[str, Any]:
    """Per label precision, recall, F1, support and average precision at ``thresholds``; micro and
    macro F1, mAP and the exact-match ratio (as torchmetrics defines them: a ratio whose
    denominator is 0 is 0)."""
    from torchmetrics.functional.classification import multilabel_average_precision

    decided = (probs >= thresholds.to(probs.device)).float()
    tp = (decided * targets).sum(0)
    fp = (decided * (1 - targets)).sum(0)
    fn = ((1 - decided) * targets).sum(0)

    def ratio(a, b):
        return torch.where(b > 0, a / b.clamp(min=1e-12), torch.zeros_like(a))

    precision, recall, f1 = ratio(tp, tp + fp), ratio(tp, tp + fn), ratio(2 * tp, 2 * tp + fp + fn)
    n = len(class_names)
    ap = (multilabel_average_precision(probs, targets.long(), num_labels=n, average=None)
          if len(probs) else torch.zeros(n))
    ap = torch.nan_to_num(torch.as_tensor(ap, dtype=torch.float32), nan=0.0)
    micro = float(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()).clamp(min=1e-12))
    return {
        "num_images": len(probs),
        "f1_micro": micro,
        "f1_macro": float(f1.mean()) if n else 0.0,
        "map": float(ap[targets.sum(0) > 0].mean()) if bool((targets.sum(0) > 0).any()) else 0.0,
        "exact_match": float((decided == targets).all(dim=1).float().mean()) if len(probs) else 0.0,
        "per_label": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "average_precision": float(ap[i]), "support": int(targets[:, i].sum()),
                             "threshold": float(thresholds[i])} for i, name in enumerate(class_names)},
        "counts": {"true_positives": tp.long().tolist(), "false_positives": fp.long().tolist(),
                   "false_negatives": fn.long().tolist()},
    }


def scores_of(matrix: torch.Tensor) -> dict[str, Any]:
    """Accuracy and per-class precision, recall, F1 with their macro averages, from a confusion
    matrix, as torchmetrics defines them: a score whose denominator is 0 is 0, and the macro
    average leaves out the classes that neither occur nor are predicted."""
    counts = torch.as_tensor(matrix, dtype=torch.float64)
    tp = counts.diagonal()
    fp, fn = counts.sum(dim=0) - tp, counts.sum(dim=1) - tp

    def ratio(numerator, denominator):
        return torch.where(denominator > 0, numerator / denominator.clamp(min=1e-300), torch.zeros_like(numerator))

    per_class = {"precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn)}
    seen = (tp + fp + fn) > 0
    macro = {k: float(v[seen].mean()) if bool(seen.any()) else 0.0 for k, v in per_class.items()}
    total = float(counts.sum())
    return {"accuracy": float(tp.sum()) / total if total else 0.0, "per_class": per_class, "macro": macro}


class TestFigures(_TestOutputsTap):
    """Figures of the test set, as PNGs in ``save_dir`` and sent to every logger that keeps images
    (``hymtl.loggers.publish_figures``: TensorBoard images, MLflow artifacts, W&B media):

    * ``test/confusion_matrix`` — counts per (true, predicted) class (:class:`ConfusionCounts`,
      synced over devices); bounded for any class count: beyond
      :data:`~hymtl.figures.MAX_HEATMAP_CLASSES` classes, the most confused ones and the most
      frequent mistakes (:func:`~hymtl.figures.confusion_matrix_figure`);
    * ``test/predictions`` — the tutorial's grid: ``num_images`` test images with predicted
      label, confidence and true label, green when right, red when wrong. The images are a
      sample spread over the true classes (round-robin, :class:`~hymtl.figures.ClassSpreadSample`,
      the same for the same ``seed`` and test set), and at least a quarter of them (at least
      one) are mistakes where the test set has that many;
    * ``test/most_wrong`` — the ``num_wrong`` misclassified images with the highest confidence.

    Memory stays at about ``2 * num_images + num_wrong`` kept images whatever the test set's
    size. The image figures show what rank 0 saw (its shard of the test set under DDP). When the test
    batches hold cached backbone features instead of images (``mode=frozen``: a
    :class:`~hymtl.features.FeatureBatch` names each row's test image), the figures are chosen
    from the same predictions, and only the few images they show are decoded at the end
    (``datamodule.test_images``): the network does not run again.
    """

    __test__ = False  # its name starts with "Test": not a test class for pytest

    def __init__(self, num_images: int = 8, num_wrong: int = 8, save_dir: str | None = None, seed: int = 0) -> None:
        super().__init__()
        self.num_images = int(num_images)
        self.num_wrong = int(num_wrong)
        self.save_dir = save_dir
        self.seed = int(seed)
        self.confusion: ConfusionCounts | None = None
        self.outputs: MultilabelOutputs | None = None

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_test_start(trainer, pl_module)
        n = len(_class_names(pl_module))
        task = getattr(pl_module, "task", None)
        # which figures fit is the task's: a confusion matrix for one label per image, per-label
        # counts and precision-recall curves for label sets
        self.multilabel = bool(getattr(task, "multilabel", False))
        self.confusion = None if self.multilabel else ConfusionCounts(n).to(pl_module.device)
        self.outputs = MultilabelOutputs().to(pl_module.device) if self.multilabel else None
        # the grid's sample, and a sample of the mistakes alone to complete it with (rows kept:
        # arrival number, image or test position, probabilities, label)
        self._sample = ClassSpreadSample(self.num_images, n, seed=self.seed)
        self._mistakes = ClassSpreadSample(self.num_images, n, seed=self.seed + 1)
        self._seen = 0
        self._wrong: tuple[torch.Tensor, ...] | None = None
        self._grid_rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._features_only = False

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        # a FeatureBatch (hymtl.features' contract): the positions of the test images it stands for
        self._index = batch.index if isinstance(batch, FeatureBatch) else None
        super().on_test_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

    def on_test_predictions(self, trainer, pl_module, images, logits, labels) -> None:
        if self.multilabel:
            self.outputs.update(pl_module.task.probabilities(logits), labels)
        else:
            self.confusion.update(logits, labels)
        if self._index is not None or images.dim() != 4:
            # a FeatureBatch (cached features or prefix activations, not pixels): keep the images'
            # positions, decoded at the end
            if self._index is None:
                return
            self._features_only = True
            images = self._index
        if self.multilabel:
            self._keep_multilabel(images, logits, labels)
        else:
            self._keep(images, logits.softmax(dim=-1), labels)

    def _keep_multilabel(self, images: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """The grid: the first ``num_images`` test images; the most wrong: the ``num_wrong`` with
        the highest loss (their label sets furthest from the truth)."""
        probs = logits.float().sigmoid().cpu()
        images, labels = images.detach().cpu(), labels.detach().cpu().float()
        if self._grid_rows is None or len(self._grid_rows[0]) < self.num_images:
            room = self.num_images - (0 if self._grid_rows is None else len(self._grid_rows[0]))
            taken = (images[:room], probs[:room], labels[:room])
            self._grid_rows = taken if self._grid_rows is None else tuple(
                torch.cat(pair) for pair in zip(self._grid_rows, taken))
        if self.num_wrong > 0:
            loss = torch.nn.functional.binary_cross_entropy(probs.clamp(1e-6, 1 - 1e-6), labels,
                                                            reduction="none").sum(dim=1)
            candidates = (images, probs, labels, loss)
            if self._wrong is not None:
                candidates = tuple(torch.cat(pair) for pair in zip(self._wrong, candidates))
            order = candidates[3].argsort(descending=True)[: self.num_wrong]
            self._wrong = tuple(t[order] for t in candidates)

    def _keep(self, images: torch.Tensor, probs: torch.Tensor, labels: torch.Tensor) -> None:
        probs = probs.float().cpu()
        images, labels = images.detach().cpu(), labels.detach().cpu()
        arrival = torch.arange(self._seen, self._seen + len(labels))
        self._seen += len(labels)
        wrong = probs.argmax(dim=-1) != labels
        self._sample.add(labels, arrival, images, probs, labels)
        if bool(wrong.any()):
            self._mistakes.add(labels[wrong], arrival[wrong], images[wrong], probs[wrong], labels[wrong])
        # keep a running top-k of confident mistakes, so memory stays at num_wrong images
        if self.num_wrong > 0 and bool(wrong.any()):
            candidates = (images[wrong], probs[wrong], labels[wrong])
            if self._wrong is not None:
                candidates = tuple(torch.cat(pair) for pair in zip(self._wrong, candidates))
            order = candidates[1].max(dim=-1).values.argsort(descending=True)[: self.num_wrong]
            self._wrong = tuple(t[order] for t in candidates)

    def _grid_sample(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The prediction grid's images (or test positions), probabilities and labels: the
        class-spread sample, its last correct items replaced by sampled mistakes until at least
        a quarter of the grid (at least one image) is wrong, where there are that many mistakes."""
        picked = self._sample.rows()
        if not picked:
            return None

        def is_wrong(row) -> bool:
            return int(row[2].argmax()) != int(row[3])
        missing = max(1, self.num_images // 4) - sum(map(is_wrong, picked))
        if missing > 0:
            taken = {int(row[0]) for row in picked}
            extra = [row for row in self._mistakes.rows() if int(row[0]) not in taken][:missing]
            correct = [i for i, row in enumerate(picked) if not is_wrong(row)]
            for slot, row in zip(reversed(correct), extra):
                picked[slot] = row
        return tuple(torch.stack(column) for column in list(zip(*picked))[1:])

    def _images_pass(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Replace the kept test-split positions (feature batches) by their images, decoded from
        the datamodule (``test_images``); without it, no image figures."""
        datamodule = trainer.datamodule
        if not isinstance(datamodule, ServesFeatures):
            log.info("test batches hold no images and the datamodule has no test_images: no image figures")
            self._grid, self._wrong = None, None
            return
        images_of = datamodule.test_images
        if self._grid is not None:
            index, probs, labels = self._grid
            self._grid = (images_of(index.tolist()), probs, labels)
        if self._wrong is not None:
            index, *rest = self._wrong
            self._wrong = (images_of(index.tolist()), *rest)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # all-reduced over devices (every rank takes part)
        computed = self.outputs.compute() if self.multilabel else self.confusion.compute().cpu()
        if not trainer.is_global_zero:
            return
        self._grid = self._grid_rows if self.multilabel else self._grid_sample()
        if self._features_only:
            self._images_pass(trainer, pl_module)
        names, norm = _class_names(pl_module), _normalisation(pl_module)
        figures = (self._multilabel_figures(pl_module, computed, names, norm) if self.multilabel
                   else self._multiclass_figures(computed, names, norm))
        pixels = {tag: render(fig) for tag, fig in figures.items()}  # each drawn once, for every output
        if self.save_dir:  # first: the run folder keeps them whatever a tracker does
            for tag, image in pixels.items():
                atomic_write_bytes(Path(self.save_dir) / f"{tag.split('/')[-1]}.png", png_bytes(image))
        run_loggers.publish_figures(trainer.loggers, pixels, trainer.global_step)
        self._grid, self._wrong, self._grid_rows = None, None, None
        self._sample = self._mistakes = None

    def _multiclass_figures(self, matrix: torch.Tensor, names: list[str], norm: dict) -> dict:
        figures = {"test/confusion_matrix": confusion_matrix_figure(matrix, names)}
        if self._grid is not None:
            images, probs, labels = self._grid
            cols = min(4, len(images))
            figures["test/predictions"] = prediction_grid(images, probs, names, labels=labels, **norm,
                                                          num_rows=-(-len(images) // cols), num_cols=cols)
        empty = (torch.zeros(0, 3, 1, 1), torch.zeros(0, len(names)), torch.zeros(0, dtype=torch.long))
        figures["test/most_wrong"] = most_wrong_grid(*(self._wrong or empty), names, **norm)
        return figures

    def _multilabel_figures(self, pl_module: LightningModule, outputs, names: list[str], norm: dict) -> dict:
        probs, targets = (t.cpu() for t in outputs)
        thresholds = pl_module.thresholds.cpu()
        scores = multilabel_scores(probs, targets, thresholds, names)
        counts = scores["counts"]
        figures = {"test/label_counts": label_counts_figure(counts["true_positives"], counts["false_positives"],
                                                            counts["false_negatives"], names),
                   "test/pr_curves": pr_curves_figure(probs, targets, names)}
        if self._grid is not None:
            images, grid_probs, labels = self._grid
            figures["test/predictions"] = multilabel_grid(images, grid_probs, labels, names, thresholds.tolist(), **norm)
        if self._wrong is not None:
            images, wrong_probs, labels, _ = self._wrong
            figures["test/most_wrong"] = multilabel_grid(images, wrong_probs, labels, names, thresholds.tolist(),
                                                         **norm, title="highest loss")
        return figures


class ClassificationReport(_TestOutputsTap):
    """Per-class precision, recall, F1 and support, their macro averages, accuracy and the
    confusion matrix of a ``trainer.test`` run, all from the one confusion matrix
    (:class:`ConfusionCounts`, all-reduced over devices at the end of the epoch; the scores as
    torchmetrics defines them, :func:`scores_of`), and the ``top_pairs`` most frequent mistakes
    (``confused_pairs``: ``{"true", "predicted", "count", "share"}``, most frequent first, see
    :func:`hymtl.figures.confused_pairs`): the table to read where the matrix is too large to
    print. The result is in :attr:`report` after the test.
    """

    def __init__(self, top_pairs: int = 20) -> None:
        super().__init__()
        self.top_pairs = int(top_pairs)
        self.metrics: ConfusionCounts | None = None
        self.report: dict[str, Any] | None = None

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_test_start(trainer, pl_module)
        self.multilabel = bool(getattr(getattr(pl_module, "task", None), "multilabel", False))
        self.metrics = (MultilabelOutputs() if self.multilabel else ConfusionCounts(len(_class_names(pl_module))))
        self.metrics = self.metrics.to(pl_module.device)
        self.report = None

    def on_test_predictions(self, trainer, pl_module, images, logits, labels) -> None:
        self.metrics.update(pl_module.task.probabilities(logits) if self.multilabel else logits, labels)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.multilabel:  # per label: precision, recall, F1, AP, support, threshold
            probs, targets = (t.cpu() for t in self.metrics.compute())
            names = _class_names(pl_module)
            self.report = {"task": "multilabel", "class_names": names,
                           **multilabel_scores(probs, targets, pl_module.thresholds.cpu(), names)}
            self.metrics.reset()
            return
        matrix = self.metrics.compute().cpu()  # all-reduced over devices
        values = scores_of(matrix)
        support = matrix.sum(dim=1)
        names = _class_names(pl_module)
        self.report = {
            "task": "multiclass",
            "class_names": names,
            "num_images": int(support.sum()),
            "accuracy": values["accuracy"],
            "per_class": {
                name: {
                    "precision": float(values["per_class"]["precision"][i]),
                    "recall": float(values["per_class"]["recall"][i]),
                    "f1": float(values["per_class"]["f1"][i]),
                    "support": int(support[i]),
                }
                for i, name in enumerate(names)
            },
            "macro": {
                "precision": values["macro"]["precision"],
                "recall": values["macro"]["recall"],
                "f1": values["macro"]["f1"],
                "support": int(support.sum()),
            },
            "confusion_matrix": matrix.tolist(),
            "confused_pairs": confused_pairs(matrix, names, self.top_pairs),
        }
        self.metrics.reset()


def command_line_hparams() -> dict[str, Any]:
    """The command line's overrides as HParams columns (``mode.lr=1e-2`` -> ``{"mode.lr": 0.01}``):
    whatever a sweep varies is then comparable in TensorBoard. Config-group choices
    (``mode=frozen``, ``experiment=…``) and ``hydra.*`` are left out: groups are represented by
    the scalar keys of the curated list in conf/callbacks/default.yaml. Empty outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return {}
    hydra_cfg = HydraConfig.get()
    groups = set(hydra_cfg.runtime.choices.keys())
    columns = {}
    for override in OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task)):
        key = override.key_or_group
        if override.is_delete() or key.startswith("hydra") or key in groups:
            continue
        value = override.value()
        if value is None or isinstance(value, (bool, int, float, str)):
            columns[key] = value
    return columns


class HParamsLogger(Callback):
    """``hp_metric`` plus the run's hyperparameters, for every logger
    (``hymtl.loggers.publish_hparams``): TensorBoard's HParams dashboard, MLflow's parameters,
    W&B's config and summary, CSV's ``hparams.yaml``: the same columns everywhere.

    Logged once per run: after ``trainer.test`` when ``metric`` is a ``test/`` metric, else at the
    end of fit (e.g. ``val/acc_best``). ``hparams`` maps dashboard column names to scalar values
    (``None`` is shown as ``"null"``: the dashboard needs one type per column); with
    ``command_line=True`` the command line's overrides are columns too
    (:func:`command_line_hparams`, read when the callback is built: DDP-spawned children have
    no Hydra state).
    """

    def __init__(self, metric: str = "test/acc", hparams: Mapping[str, Any] | None = None,
                 command_line: bool = True) -> None:
        self.metric = metric
        self.hparams: dict[str, Any] = dict(hparams or {})
        if command_line:
            self.hparams.update(command_line_hparams())

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.metric.startswith("test/"):
            self._log(trainer)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.metric.startswith("test/"):
            self._log(trainer)

    def _log(self, trainer: Trainer) -> None:
        value = trainer.callback_metrics.get(self.metric)
        if value is None or trainer.sanity_checking:
            log.warning("hp_metric: %s was not logged; HParams dashboard entry skipped", self.metric)
            return
        value = float(value)
        params = {str(k): ("null" if v is None else v) for k, v in self.hparams.items()}
        if trainer.is_global_zero and not math.isnan(value):
            run_loggers.publish_hparams(trainer.loggers, params, {"hp_metric": value}, trainer.global_step)


# --------------------------------------------------------------------------- the run's summary
class RunSummary(Callback):
    """The final numbers of a run, published by the run itself: ``metrics.json`` (written
    atomically by global rank zero) and the tutorial's two lines.

    Collected at the end of fit (``train/*``, ``val/*``, ``epochs``, the best checkpoint, the
    device) and, when a test follows (``expect_test``), completed after ``trainer.test``
    (``test/*``); then written. Keys: ``train/*``, ``val/*``, ``test/*``, ``examples_per_sec``
    (the logged ``train/examples_per_sec`` of :class:`ExamplesPerSecond`), ``epochs``,
    ``wall_time_s`` (since this callback was built), ``mode``, ``backbone``, ``class_names``,
    ``test_split``, ``split_report`` (the datamodule's ``split_report``: what does not match
    between the splits, ``None`` when nothing), ``best_checkpoint``, ``device``, ``skipped_files`` (lines of
    ``skipped_file``, with one warning that summarises them).

    The end of the run's output, after the progress bar closed (:func:`end_lines`): the
    tutorial's two lines, the run folder ``run_dir``, the best checkpoint and the command that
    opens the run's dashboard. The log file gets them too, with the test's numbers and the
    checkpoints' paths.

    The result is in :attr:`metrics` in the process that ran the stages. Under a spawning DDP
    launcher the stages run in child processes, so the caller reads the file back with
    :meth:`result` (or :meth:`read`); there the fit's part is also written when fit ends, for
    the test's children to complete.
    """

    def __init__(self, path: str | os.PathLike, mode: str | None = None, backbone: str | None = None,
                 skipped_file: str | os.PathLike | None = None, expect_test: bool = True,
                 run_dir: str | os.PathLike | None = None) -> None:
        self.started = time.perf_counter()  # monotonic clock: comparable in spawned children
        self.path = Path(path)
        self.run_dir = Path(run_dir) if run_dir else self.path.parent
        self.mode = mode
        self.backbone = backbone
        self.skipped_file = Path(skipped_file) if skipped_file else None
        self.expect_test = bool(expect_test)
        self.metrics: dict[str, Any] = {}
        self._fit: dict[str, Any] | None = None
        self._lines: list[str] | None = None  # the end of the output, printed at teardown

    # ------------------------------------------------------------------ hooks
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))}
        throughput = metrics.pop("train/examples_per_sec", None)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        class_names = getattr(pl_module, "class_names", None)
        task = getattr(pl_module, "task", None)
        metrics.update({
            "task": task.describe() if task is not None else None,
            "examples_per_sec": throughput,
            "epochs": trainer.current_epoch,
            "class_names": list(class_names) if class_names is not None else None,
            "test_split": getattr(trainer.datamodule, "test_split_name", None),
            # what does not match between the splits (unknown classes, duplicates): see the datamodule
            "split_report": getattr(trainer.datamodule, "split_report", None) or None,
            "best_checkpoint": best or None,
            "device": device_name(trainer),
        })
        record = getattr(pl_module, "run_record", None)
        metrics.update(record() if callable(record) else {})  # the regime's own record (the depth search's steps)
        self._fit = metrics
        if trainer.is_global_zero:  # what the fit left on disk (the test restores the best one)
            folders = {Path(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)}
            for path in sorted(p for folder in folders for p in folder.glob("*.ckpt")):
                log.info("checkpoint: %s%s", path, " (best)" if best and Path(best) == path else "", extra=FILE_ONLY)
        if not self.expect_test:
            self._finish(trainer, {})
        elif _spawned(trainer) and trainer.is_global_zero:
            atomic_write_json(self.path, self._assemble(metrics, {}))  # for the test's children

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.expect_test:
            return
        if self._fit is None:  # the fit ran in other (spawned) processes: its part is on disk
            self._fit = self.read(self.path) if self.path.is_file() else {}
        self._finish(trainer, {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})

    # ------------------------------------------------------------------ result
    def result(self) -> dict[str, Any]:
        """The run's metrics: :attr:`metrics` where this process ran the stages, else ``metrics.json``."""
        return dict(self.metrics) if self.metrics else self.read(self.path)

    @staticmethod
    def read(path: str | os.PathLike) -> dict[str, Any]:
        """A ``metrics.json`` written by :class:`RunSummary`."""
        try:
            return json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise HymtlError(f"cannot read the run's metrics {path}: {first_line(exc)}") from None

    # ------------------------------------------------------------------ assembly
    def _assemble(self, fit: Mapping[str, Any], test: Mapping[str, Any]) -> dict[str, Any]:
        metrics = {k: v for k, v in fit.items() if k.startswith(("train/", "val/"))}
        metrics.update(test)
        metrics.update({
            "examples_per_sec": fit.get("examples_per_sec"),
            "epochs": fit.get("epochs", 0),
            "wall_time_s": time.perf_counter() - self.started,
            "mode": self.mode,
            "backbone": self.backbone,
            "task": fit.get("task"),
            "class_names": fit.get("class_names"),
            "test_split": fit.get("test_split"),
            "split_report": fit.get("split_report"),
            "best_checkpoint": fit.get("best_checkpoint"),
            "device": fit.get("device"),
        })
        if "depth_search" in fit:
            metrics["depth_search"] = fit["depth_search"]
        return metrics

    def _finish(self, trainer: Trainer, test: Mapping[str, Any]) -> None:
        from hymtl.data.images import read_skipped, summarize_skipped

        metrics = self._assemble(self._fit or {}, test)
        skipped = read_skipped(self.skipped_file) if self.skipped_file else []  # up-front check + decode failures in workers
        metrics["skipped_files"] = len(skipped)
        if skipped and trainer.is_global_zero:
            log.warning("%s (list in %s)", summarize_skipped(skipped), self.skipped_file)
        self.metrics = metrics
        if not trainer.is_global_zero:
            return
        # every logger gets the final numbers, then metrics.json says where each one put the run
        run_loggers.publish_summary(trainer.loggers, metrics, str(self.run_dir), trainer.global_step)
        metrics["loggers"] = run_loggers.where(trainer.loggers)
        atomic_write_json(self.path, metrics)
        run_loggers.finish(trainer.loggers)
        if test:  # the console has Lightning's table of them
            log.info("test on the %s split: %s", metrics.get("test_split") or "test",
                     ", ".join(f"{k} {float(v):.4f}" for k, v in sorted(test.items())), extra=FILE_ONLY)
        self._lines = end_lines(metrics, self.run_dir)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # after every callback's on_*_end: the progress bar has closed its line
        lines, self._lines = self._lines, None
        if lines:
            print("\n".join(lines), flush=True)
            for line in lines:
                log.info("%s", line, extra=FILE_ONLY)


def end_lines(metrics: Mapping[str, Any], run_dir: str | os.PathLike) -> list[str]:
    """The end of a run's output: the tutorial's two lines (when it was tested), then where its
    results are: the run folder, the best checkpoint, and a line or two per logger
    (``metrics["loggers"]``, :func:`hymtl.loggers.end_lines`; a ``metrics.json`` older than it
    names TensorBoard's)::

        loss 0.333, train acc 0.865, test acc 0.922
        35.0 examples/sec on cpu
        run folder: outputs/2026-01-01/12-00-00
        best checkpoint: outputs/2026-01-01/12-00-00/checkpoints/best-epoch03-acc0.9216.ckpt
        dashboard: tensorboard --logdir outputs/2026-01-01/12-00-00
        mlflow: experiment hymtl (id 1), run 0f3c…: mlflow ui --backend-store-uri sqlite:///outputs/mlruns/mlflow.db
    """
    lines = []
    task = make_task(metrics.get("task"))
    headline = task.end_line(metrics) if "train/loss" in metrics else None
    rate = f"{metrics.get('examples_per_sec') or 0.0:.1f} examples/sec on {metrics.get('device') or '?'}"
    if headline is not None:
        lines += [headline, rate]
    elif "test/acc" in metrics and "train/loss" in metrics:
        lines += tutorial_lines(metrics["train/loss"], metrics.get("train/acc", float("nan")), metrics["test/acc"],
                                metrics.get("examples_per_sec") or 0.0, metrics.get("device") or "?").splitlines()
        if "test/acc_macro" in metrics:  # beside accuracy: a class the model never gets right shows here
            lines.append(f"test acc macro {float(metrics['test/acc_macro']):.3f} (the mean of the per-class accuracies)")
    imbalance = ((metrics.get("split_report") or {}).get("train_imbalance") or {}).get("ratio")
    if imbalance is not None and imbalance > IMBALANCE_RATIO:
        lines.append(f"warning: the training classes are unbalanced 1:{imbalance:.1f}; data.sampler=balanced or "
                     "model.class_weights=auto may raise the macro numbers")
    best = metrics.get("best_checkpoint")
    lines += [f"run folder: {shown_path(run_dir)}",
              f"best checkpoint: {shown_path(best) if best else 'none saved'}"]
    places = metrics.get("loggers", {"tensorboard": {}})
    return lines + run_loggers.end_lines(places, str(run_dir))


def _spawned(trainer: Trainer) -> bool:
    """True when the stages run in processes the launcher starts per stage (spawn/fork): the
    caller's callback objects see none of their hooks."""
    from lightning.pytorch.strategies.launchers.multiprocessing import _MultiProcessingLauncher

    return isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher)


# --------------------------------------------------------------------------- the time budget
class TimeBudget(Callback):
    """``budget=5m``: a ceiling on the fit's wall time, for every regime. After each epoch it
    stops the fit when the next epoch would end past the budget (estimated from the epochs so
    far) and says what it cut; when the first epoch alone (extraction included) already took
    longer than the budget, no budget that small can run: one error line names the smallest
    that would. The time counts from the start of this process's fit (a resumed fit gets the
    budget afresh). ``mode=auto`` plans its depth within the same budget
    (:class:`hymtl.depth_search.DepthSearch`); this is its backstop.
    """

    def __init__(self, budget: Any = None) -> None:
        self.budget = None if budget is None else checked_number("budget", budget, "duration", 0, exclusive=True)
        self._started = self._epoch_started = None
        self._epochs: list[float] = []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._started = self._epoch_started = time.monotonic()
        self._epochs = []

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.budget is None or self._started is None:
            return
        now = time.monotonic()
        self._epochs.append(now - self._epoch_started)
        self._epoch_started = now
        elapsed, next_epoch = now - self._started, max(self._epochs[-3:])
        if trainer.world_size > 1:  # rank 0's clock for everyone: the same decision on every rank
            elapsed, next_epoch = trainer.strategy.broadcast((elapsed, next_epoch), src=0)
        if len(self._epochs) == 1 and elapsed > self.budget:
            raise HymtlError(f"budget={self.budget:g} s is shorter than the run's first epoch ({elapsed:.0f} s, the "
                             f"feature extraction included): the smallest budget that would run is "
                             f"{math.ceil(elapsed * 1.2)} s (budget={math.ceil(elapsed * 1.2)})")
        done, planned = trainer.current_epoch + 1, trainer.max_epochs
        if trainer.should_stop:  # stopping anyway (the depth search decided, early stopping)
            return
        if elapsed + next_epoch > self.budget and (planned is None or planned < 0 or done < planned):
            trainer.should_stop = True
            if trainer.is_global_zero:
                cut = f"{planned - done} of {planned} epochs" if planned and planned > 0 else "the remaining epochs"
                log.warning("budget %g s: stopping after epoch %d (%.0f s in; the next would end near %.0f s); "
                            "cut: %s", self.budget, trainer.current_epoch, elapsed, elapsed + next_epoch, cut)


# --------------------------------------------------------------------------- early stopping
class EarlyStopping(LightningEarlyStopping):
    """Lightning's ``EarlyStopping`` that knows the regime: its patience counts afresh from the
    start of the module's current phase (``phase_start_epoch``: the unfreeze epoch k of a
    two-phase run, each step of the depth search), and a non-improving epoch before that start
    does not count — a two-phase run never stops while the backbone is frozen, and its earliest
    stop is after epoch ``k + patience - 1`` (``k + patience`` epochs run). The counter lives in
    Lightning's state (``wait_count``, saved with every checkpoint): a resumed run keeps it.

    ``conf/callbacks/early_stopping.yaml`` gives it the checkpoint's ``monitor`` and ``mode``;
    the phase is asked of the module: one source for each.
    """

    def _run_early_stopping_check(self, trainer: Trainer) -> None:
        self._epoch = trainer.current_epoch
        phase_start = getattr(trainer.lightning_module, "phase_start_epoch", None)
        self._phase_start = phase_start(self._epoch) if callable(phase_start) else 0
        stopping = trainer.should_stop
        super()._run_early_stopping_check(trainer)
        if trainer.should_stop and not stopping and trainer.is_global_zero and self.stopping_reason_message:
            log.info("early stopping after epoch %d: %s", trainer.current_epoch, self.stopping_reason_message)

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
        waited, stopping_reason = self.wait_count, self.stopping_reason
        should_stop, reason = super()._evaluate_stopping_criteria(current)
        # epochs of the current phase seen so far: a non-improving epoch before it does not count
        trained = getattr(self, "_epoch", 0) - getattr(self, "_phase_start", 0) + 1
        if self.wait_count > waited and self.wait_count > max(trained, 0):  # the patience branch ran
            self.wait_count = max(trained, 0)
            if self.wait_count < self.patience:
                should_stop, reason, self.stopping_reason = False, None, stopping_reason
        return should_stop, reason
