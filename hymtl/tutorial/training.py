"""The tutorial's training: :func:`train_fine_tuning`, through Lightning's ``Trainer.fit`` on a
:class:`~hymtl.tutorial.ClassifierModule`, with the Trainer of ``conf/``."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from typing import Any, Iterable, Iterator, Sequence

import lightning.pytorch as pl
import torch
from hydra.utils import instantiate
from torch import nn

from hymtl.callbacks import EpochLines, ExamplesPerSecond
from hymtl.errors import HymtlError
from hymtl.figures import epoch_curves
from hymtl.model import constant_schedule
from hymtl.progress import on_terminal
from hymtl.runtime import device_name
from hymtl.tutorial.configs import TUTORIAL_DIR, composed_config
from hymtl.tutorial.history import EpochCurve, History, in_notebook
from hymtl.tutorial.module import ClassifierModule
from hymtl.tutorial.networks import find_head, num_classes_of
from hymtl.tutorial.predictions import save_figure


def train_fine_tuning(
    net: nn.Module,
    train_iter: Iterable,
    test_iter: Iterable,
    learning_rate: float,
    num_epochs: int = 5,
    device: Any = None,
    param_group: bool = True,
    *,
    original: bool = False,
    class_names: Sequence[str] | None = None,
    curve_path: str | os.PathLike | None | bool = None,
    title: str | None = None,
    precision: str | None = None,
) -> History:
    """Train ``net`` (any ``nn.Module`` classifier) on ``train_iter`` and report the accuracy on
    ``test_iter`` after every epoch, through Lightning (``Trainer.fit`` on a
    :class:`~hymtl.tutorial.ClassifierModule`); print the tutorial's two lines; draw the curve.
    Progress shows as Lightning's bar on a terminal or in a notebook, else as one printed line
    per epoch (:class:`hymtl.callbacks.EpochLines`) before the two lines.

    ``param_group=True``: the head (``fc``, ``classifier`` or timm's ``get_classifier()``)
    trains at ``10 * learning_rate``, every other trainable parameter at ``learning_rate``.
    ``param_group=False``: every parameter that requires grad at ``learning_rate``. Frozen
    parameters (``requires_grad=False``, see :func:`~hymtl.tutorial.freeze`) are never handed
    to the optimizer: freezing everything but a new head is the fixed-feature-extractor scenario.

    Where this differs from the original tutorial's ``train_fine_tuning`` (plain SGD, weight
    decay 1e-3, constant rate, summed batch loss, every layer in ``train()`` mode):

    * SGD with momentum 0.9 (weight decay 1e-3 as there);
    * the rate follows a cosine decay over ``num_epochs``;
    * the loss is the batch mean, so the rate does not depend on the batch size;
    * BatchNorm layers whose parameters are all frozen stay in eval mode: a frozen extractor
      keeps its ImageNet statistics instead of drifting to these 244 images;
    * precision: bf16 autocast where the hardware has it (``precision`` overrides; the
      original runs fp32).

    ``original=True`` restores the original's optimizer, constant rate, summed loss and
    BatchNorm behaviour (and fp32 unless ``precision`` says otherwise).

    Args:
        net: the classifier (images -> logits); trained in place.
        train_iter, test_iter: loaders of ``(images, labels)`` (``Hymenoptera().dataloaders``).
        learning_rate, num_epochs, param_group: as in the tutorial.
        device: ``None`` (a GPU if there is one, else the CPU), ``"cpu"``, ``"cuda:0"``,
            a ``torch.device`` or a one-element list of them.
        class_names: names of the classes (default ``"0"``, ``"1"``, …).
        curve_path: where to save the per-epoch curve as a PNG. Default: drawn live in a
            notebook and not saved; elsewhere saved to
            ``outputs/tutorial/<timestamp>-train_fine_tuning.png``. ``False``: not saved.
        title: the curve's title.

    Returns:
        :class:`History`: per-epoch ``train_loss``, ``train_acc``, ``test_acc``,
        ``examples_per_sec``, ``device``, the curve ``figure`` and ``curve_path``.
    """
    _check_arguments(net, num_epochs, learning_rate)
    module = _classifier_module(net, learning_rate, param_group, original, class_names)
    live = in_notebook()
    history = History()
    throughput = ExamplesPerSecond()
    callbacks = [throughput, EpochCurve(history, title, live), EpochLines(bar=on_terminal() or live, echo=True)]
    with _quiet():
        trainer = _tutorial_trainer(int(num_epochs), device, precision, original, callbacks)
        # Lightning keeps the modes it finds; a net left in eval mode (after a previous call or
        # show_predictions) must train in train mode (frozen BatchNorm: see ClassifierModule)
        module.train()
        trainer.fit(module, train_dataloaders=train_iter, val_dataloaders=test_iter)
    net.eval()  # the tutorial evaluates and shows predictions next
    history.examples_per_sec = throughput.examples_per_sec
    history.device = device_name(trainer)
    if not history.epochs:
        raise HymtlError("training ended before the first epoch finished")
    _draw_curve(history, curve_path, title, live)
    print(history.lines(), flush=True)
    return history


def _check_arguments(net: nn.Module, num_epochs: int, learning_rate: float) -> None:
    """One line for an argument that cannot train: not a network, no epoch, no positive rate."""
    if not isinstance(net, nn.Module):
        raise HymtlError(f"net must be a torch nn.Module, got {type(net).__name__}")
    if int(num_epochs) < 1:
        raise HymtlError(f"num_epochs must be at least 1, got {num_epochs}")
    if not learning_rate or learning_rate <= 0:
        raise HymtlError(f"learning_rate must be positive, got {learning_rate}")


def _classifier_module(net: nn.Module, learning_rate: float, param_group: bool, original: bool,
                       class_names: Sequence[str] | None) -> ClassifierModule:
    """``net`` under the project's steps: the head at 10x the rate (``param_group``), the
    optimizer and schedule of the tutorial (``original``) or of the project."""
    head = find_head(net)[1] if param_group else None
    if original:
        optimizer = {"_target_": "torch.optim.SGD", "weight_decay": 1e-3}
        scheduler = {"_target_": f"{constant_schedule.__module__}.constant_schedule"}
    else:
        optimizer = {"_target_": "torch.optim.SGD", "momentum": 0.9, "weight_decay": 1e-3}
        scheduler = None  # the project's default: cosine over the run
    return ClassifierModule(
        net,
        num_classes=num_classes_of(net),
        class_names=class_names,
        lr=learning_rate,
        head_parameters=list(head.parameters()) if head is not None else None,
        head_lr_mult=10.0,
        optimizer=optimizer,
        scheduler=scheduler,
        frozen_batchnorm_eval=not original,
        loss_reduction="sum" if original else "mean",
    )


def _tutorial_trainer(num_epochs: int, device: Any, precision: str | None, original: bool,
                      callbacks: list) -> pl.Trainer:
    """The Trainer of ``conf/trainer/default.yaml``, as every run's (precision: bf16 where the
    hardware has it; fp32 for the ``original`` recipe), for a notebook's call: no run folder, no
    checkpoints. Progress: Lightning's bar on a terminal (a widget in a notebook), else a
    printed line per epoch (a long fine-tuning epoch is not silent in a log or a pipe)."""
    accelerator, devices = _accelerator(device)
    overrides = [f"trainer.accelerator={accelerator}"]
    if precision is None and original:
        precision = "32-true"
    if precision is not None:
        overrides.append(f"trainer.precision={precision}")
    trainer_cfg = composed_config(*overrides).trainer
    return instantiate(trainer_cfg, _partial_=True)(
        max_epochs=num_epochs,
        devices=devices,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=True,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )


def _accelerator(device: Any) -> tuple[str, Any]:
    """``None``/"auto", "cpu", "cuda", "cuda:1", ``torch.device``, or a one-element list of
    those -> Lightning's ``(accelerator, devices)``."""
    if isinstance(device, (list, tuple)):
        if len(device) != 1:
            raise HymtlError("train_fine_tuning runs on one device; for several use python -m hymtl.train trainer=ddp")
        device = device[0]
    if device is None or device == "auto":
        return "auto", 1
    device = torch.device(device)
    if device.type == "cuda":
        return "gpu", [device.index] if device.index is not None else 1
    return device.type, 1


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Lightning's start-up banners and dataloader hints off: the tutorial prints two lines."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=r".*number of training batches.*log_every_n_steps.*")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
            # frozen BatchNorm layers are in eval mode on purpose (see ClassifierModule)
            warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _draw_curve(history: History, curve_path: str | os.PathLike | None | bool, title: str | None, live: bool) -> None:
    """The per-epoch curve as ``history.figure``, saved to ``curve_path`` (``None``: a stamped PNG
    in :data:`~hymtl.tutorial.configs.TUTORIAL_DIR`, except in a notebook, which drew it live)."""
    history.figure = epoch_curves(history.series(), title=title)
    if curve_path is None and not live:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        curve_path = TUTORIAL_DIR / f"{stamp}-train_fine_tuning.png"
    if curve_path:
        history.curve_path = save_figure(history.figure, curve_path)
