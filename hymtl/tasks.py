"""The task type: what the head's outputs mean, and everything that follows from it.

``task=multiclass`` (one label per image: softmax, cross-entropy, accuracy) or
``task=multilabel`` (a set of labels per image: sigmoid per label, BCE with logits, F1 and mAP,
a decision threshold). Every other room asks the task instead of branching on a flag:

==============================  ==========================================================
who                             asks the task for
==============================  ==========================================================
``model.TransferModule``        the loss (with class weights), the metrics, what a step
                                feeds them, the threshold it keeps and tunes, probabilities
``conf/`` (``task.monitor``)    the metric checkpoints, early stopping and sweeps optimise
``callbacks`` (figures, end)    which figures fit, the end-of-run line
``inference`` (predict, serve)  probabilities and the labels they decode to
``export``                      the output activation and threshold in the description
``mixing`` (mixup, cutmix)      target vectors to blend, the labels a blend stands for
==============================  ==========================================================

A task is described by a small plain dict (``{"name": "multilabel", "threshold": 0.5}``), saved
with the checkpoint and the export description, and rebuilt by :func:`make_task` from a
registry — never by importing a name read from a file.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Sequence

import torch
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MultilabelAveragePrecision,
    MultilabelExactMatch,
    MultilabelF1Score,
)

from hymtl.errors import HymtlError


class TaskError(HymtlError):
    """A task setting that cannot work (an unknown task, a threshold outside (0, 1))."""


class Task:
    """What every task answers; :class:`MulticlassTask` and :class:`MultilabelTask` fill it in."""

    name: str = ""
    multilabel: bool = False
    #: the metrics logged per split (``<split>/<key>``): ``metric`` (one of them) is optimised
    metric_keys: tuple[str, ...] = ()

    def __init__(self, metric: str | None = None):
        self.metric = metric or self.metric_keys[0]
        if self.metric not in self.metric_keys:
            raise TaskError(f"task.metric must be one of {', '.join(self.metric_keys)} for task={self.name}, "
                            f"got {metric!r}")

    @property
    def monitor(self) -> str:
        """The validation metric checkpoints, early stopping and sweeps optimise."""
        return f"val/{self.metric}"

    def describe(self) -> dict[str, Any]:
        """The plain dict that rebuilds this task (:func:`make_task`): checkpoints, exports."""
        return {"name": self.name, "metric": self.metric}

    def loss(self, weights: torch.Tensor | None, label_smoothing: float = 0.0) -> nn.Module:
        raise NotImplementedError

    def metrics(self, num_classes: int, prefix: str) -> MetricCollection:
        raise NotImplementedError

    def ranking_metrics(self, num_classes: int, prefix: str) -> MetricCollection | None:
        """Metrics fed probabilities rather than decisions (mAP); ``None``: none."""
        return None

    def metric_inputs(self, logits: torch.Tensor, targets: torch.Tensor, threshold: torch.Tensor | None):
        """``(preds, target)`` as the metrics of :meth:`metrics` take them."""
        return logits, targets

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target_vectors(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The batch's targets as ``(N, num_classes)`` float vectors: what mixup and cutmix
        (:mod:`hymtl.mixing`) blend, and what the loss takes once blended."""
        raise NotImplementedError

    def hard_targets(self, vectors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Blended target ``vectors`` back as labels like ``labels`` (the batch's own): the label of
        each mix's larger part, what the training metrics score a mixed input against."""
        raise NotImplementedError

    def logits_of(self, probabilities: torch.Tensor) -> torch.Tensor:
        """Logits whose :meth:`probabilities` are ``probabilities`` (averaged test-time views)."""
        raise NotImplementedError

    def loss_weights(self, counts: Sequence[int] | None, setting: Any, images: int | None = None) -> torch.Tensor | None:
        """``model.class_weights``: ``None`` (no weights), ``"auto"`` (from the training
        ``counts`` per class, of ``images`` training images) or one weight per class."""
        if setting in (None, "none", False):
            return None
        if isinstance(setting, str):
            if setting != "auto":
                raise TaskError(f"model.class_weights must be null, auto or a list of numbers, got {setting!r}")
            if not counts:
                raise TaskError("model.class_weights=auto needs the training class counts")
            return self._auto_weights(list(counts), images or sum(counts))
        weights = [float(w) for w in setting]
        if len(weights) != len(counts or weights) or not all(math.isfinite(w) and w > 0 for w in weights):
            raise TaskError(f"model.class_weights must hold one positive number per class, got {list(setting)}")
        return torch.tensor(weights, dtype=torch.float32)

    def _auto_weights(self, counts: list[int], images: int) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, probabilities: Sequence[float], class_names: Sequence[str], topk: int = 1,
               threshold: Sequence[float] | None = None) -> list[tuple[str, float]]:
        """The labels one image's probabilities stand for, best first: the top ``topk`` classes
        (multi-class), or every label over its threshold (multi-label)."""
        raise NotImplementedError

    def end_line(self, metrics: dict[str, Any]) -> str | None:
        """The end of a run's headline numbers (``None``: the tutorial's own line fits)."""
        return None


class MulticlassTask(Task):
    """One label per image: softmax over the classes, cross-entropy, accuracy (micro: the
    fraction of images right) with the macro average beside it."""

    name = "multiclass"
    metric_keys = ("acc", "acc_macro")

    def loss(self, weights: torch.Tensor | None, label_smoothing: float = 0.0) -> nn.Module:
        # takes class indices, or class probabilities (N, C): the targets of a mixed batch
        return nn.CrossEntropyLoss(weight=weights, label_smoothing=label_smoothing)

    def metrics(self, num_classes: int, prefix: str) -> MetricCollection:
        return MetricCollection({"acc": MulticlassAccuracy(num_classes, average="micro"),
                                 "acc_macro": MulticlassAccuracy(num_classes, average="macro")}, prefix=prefix)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return _at_least_float32(logits).softmax(dim=-1)

    def logits_of(self, probabilities: torch.Tensor) -> torch.Tensor:
        return probabilities.clamp(min=1e-45).log()  # softmax(log p) = p for p summing to 1

    def target_vectors(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        return torch.nn.functional.one_hot(labels.long(), num_classes).float()

    def hard_targets(self, vectors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # the class of the larger part (torchvision's reference scripts score mixed batches so)
        return vectors.argmax(dim=-1).to(labels.dtype)

    def _auto_weights(self, counts: list[int], images: int) -> torch.Tensor:
        # inverse frequency, normalised so that a balanced set gets 1.0 everywhere (sklearn's "balanced")
        total, k = sum(counts), len(counts)
        return torch.tensor([total / (k * max(1, n)) for n in counts], dtype=torch.float32)

    def decode(self, probabilities, class_names, topk=1, threshold=None):
        order = sorted(range(len(probabilities)), key=lambda i: -float(probabilities[i]))[: max(1, topk)]
        return [(class_names[i], float(probabilities[i])) for i in order]


class MultilabelTask(Task):
    """A set of labels per image: a sigmoid per label, BCE with logits, micro and macro F1 at the
    decision threshold, mAP (threshold-free) and the exact-match ratio.

    Args:
        threshold: the decision threshold, one for every label (default 0.5), or ``"tune"``: after
            each validation the threshold of each label that maximises its F1 on val is kept
            (saved with the checkpoint, used by test, predict, serve and export).
    """

    name = "multilabel"
    multilabel = True
    metric_keys = ("f1_micro", "f1_macro", "map", "exact_match")

    def __init__(self, threshold: float | str = 0.5, metric: str | None = None):
        super().__init__(metric)
        if threshold == "tune":
            self.tune = True
            self.threshold = 0.5
        else:
            try:
                value = float(threshold)
            except (TypeError, ValueError):
                value = math.nan
            if not 0.0 < value < 1.0:
                raise TaskError(f"task.threshold must be a number between 0 and 1 (exclusive) or tune, got {threshold!r}")
            self.tune, self.threshold = False, value

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "threshold": "tune" if self.tune else self.threshold}

    def loss(self, weights: torch.Tensor | None, label_smoothing: float = 0.0) -> nn.Module:
        if label_smoothing:
            raise TaskError("model.label_smoothing is for task=multiclass")
        return nn.BCEWithLogitsLoss(pos_weight=weights)

    def metrics(self, num_classes: int, prefix: str) -> MetricCollection:
        # predictions arrive as 0/1 at the kept threshold(s) (metric_inputs); mAP takes probabilities
        return MetricCollection({
            "f1_micro": MultilabelF1Score(num_classes, average="micro"),
            "f1_macro": MultilabelF1Score(num_classes, average="macro"),
            "exact_match": MultilabelExactMatch(num_classes),
        }, prefix=prefix)

    def ranking_metrics(self, num_classes: int, prefix: str) -> MetricCollection:
        """The threshold-free metrics (fed probabilities): mAP, the mean over labels of the area
        under each label's precision-recall curve."""
        return MetricCollection({"map": MultilabelAveragePrecision(num_classes, average="macro")}, prefix=prefix)

    def metric_inputs(self, logits, targets, threshold):
        return self.decisions(self.probabilities(logits), targets, threshold)

    def decisions(self, probabilities: torch.Tensor, targets: torch.Tensor, threshold: torch.Tensor | None):
        """``(0/1 decisions at the threshold(s), 0/1 targets)``: what the F1 metrics take."""
        cut = threshold if threshold is not None else torch.full((probabilities.shape[-1],), self.threshold)
        return (probabilities >= cut.to(probabilities.device)).int(), targets.int()

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return _at_least_float32(logits).sigmoid()

    def logits_of(self, probabilities: torch.Tensor) -> torch.Tensor:
        return probabilities.logit(eps=1e-7)

    def target_vectors(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        return labels.float()  # already 0/1 per label; BCE takes weights in [0, 1] as well

    def hard_targets(self, vectors: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # a label of both images (1.0) or of the larger part (weight > 0.5): the larger part's label set
        return (vectors >= 0.5).to(labels.dtype)

    def _auto_weights(self, counts: list[int], images: int) -> torch.Tensor:
        # BCE's pos_weight: negatives / positives per label (capped: a label seen once is not x1000)
        return torch.tensor([min(100.0, (images - n) / max(1, n)) for n in counts], dtype=torch.float32)

    def decode(self, probabilities, class_names, topk=1, threshold=None):
        cuts = list(threshold) if threshold is not None else [self.threshold] * len(class_names)
        chosen = [i for i, p in enumerate(probabilities) if float(p) >= cuts[i]]
        chosen.sort(key=lambda i: -float(probabilities[i]))
        return [(class_names[i], float(probabilities[i])) for i in chosen]

    def end_line(self, metrics: dict[str, Any]) -> str | None:
        def number(key: str) -> str:
            value = metrics.get(key)
            return f"{float(value):.3f}" if isinstance(value, (int, float)) else "n/a"

        return (f"loss {number('train/loss')}, train f1 {number('train/f1_micro')}, test f1 micro "
                f"{number('test/f1_micro')}, macro {number('test/f1_macro')}, mAP {number('test/map')}")


def _at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits as float32; float64 stays float64 (exact probabilities for reports)."""
    return logits if logits.dtype == torch.float64 else logits.float()


def tune_thresholds(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per label, the threshold among the observed probabilities that maximises that label's F1
    on ``(probabilities, targets)``; 0.5 for a label with no positive."""
    thresholds = torch.full((probabilities.shape[1],), 0.5)
    for label in range(probabilities.shape[1]):
        p, t = probabilities[:, label], targets[:, label].bool()
        if not t.any():
            continue
        candidates = torch.unique(p)
        predicted = p.unsqueeze(0) >= candidates.unsqueeze(1)  # (candidates, images)
        tp = (predicted & t).sum(1).float()
        f1 = 2 * tp / (predicted.sum(1) + t.sum()).clamp(min=1)
        thresholds[label] = float(candidates[int(f1.argmax())])
    return thresholds


#: task name -> class: what ``task=`` and a checkpoint's saved ``{"name": …}`` may name
TASKS: dict[str, type[Task]] = {"multiclass": MulticlassTask, "multilabel": MultilabelTask}


def make_task(description: dict[str, Any] | Task | None) -> Task:
    """The task a plain description names (``None``: multi-class, what older checkpoints hold)."""
    if isinstance(description, Task):
        return description
    description = dict(description or {"name": "multiclass"})
    name = description.pop("name", "multiclass")
    cls = TASKS.get(name)
    if cls is None:
        raise TaskError(f"unknown task {name!r}: one of {', '.join(TASKS)}")
    # conf/task/*.yaml state the kind for the data's sake (task.multilabel): a fact, not a setting
    if description.pop("multilabel", cls.multilabel) != cls.multilabel:
        raise TaskError(f"task={name} is {'' if cls.multilabel else 'not '}multi-label: task.multilabel cannot change that")
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    for key in description:
        if key not in known:
            raise TaskError(f"task.{key} is not a setting of task={name} (its settings: "
                            f"{', '.join('task.' + k for k in sorted(known))})")
    return cls(**description)
