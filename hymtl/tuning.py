"""The learning-rate range test of ``python -m hymtl.lr_find``, on the regime as configured.

Lightning's tuner (:meth:`lightning.pytorch.tuner.Tuner.lr_find`) trains for ``num_training``
steps while raising the learning rate exponentially, records the smoothed loss, and suggests the
rate of the steepest descent. Its scheduler gives *every* parameter group the same rate; here the
swept rate is ``mode.lr`` — the module's base rate — and each group steps at it times the factor
the module itself gives that group at the start of the phase (:class:`GroupFactors`: the head
at ``head_lr_mult``, the backbone at ``backbone_lr_mult``, or 0 while it is frozen). The groups
are the module's fixed ones (no group is added mid-run, unlike ``BackboneFinetuning``, which is
what breaks Lightning's finder: Lightning issue #14674), so the suggestion is the ``mode.lr=…``
to paste.

Phases (:func:`phases`): ``frozen`` and ``partial`` are one search each, on the cached features
or activations the datamodule serves while the module says so (seconds once cached);
``finetune`` one search on images; ``two_phase`` two: the head phase (the backbone frozen: on
cached features) and the unfrozen phase (the backbone — or its top ``trainable_stages`` —
training with the head from a fresh head, at the regime's multipliers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hymtl.errors import HymtlError, printable



@dataclass
class Phase:
    """One range test: its name and what it changes in the configured module."""

    name: str
    model_overrides: dict = field(default_factory=dict)


def phases(unfreeze_at_epoch: int | None) -> list[Phase]:
    """The searches a regime needs: one, or two for a two-phase schedule (``unfreeze_at_epoch > 0``)."""
    if unfreeze_at_epoch is None:
        return [Phase("head (frozen backbone)")]
    if unfreeze_at_epoch == 0:
        return [Phase("whole schedule")]
    return [Phase("head phase", {"unfreeze_at_epoch": None, "trainable_stages": None}),
            Phase("unfrozen phase", {"unfreeze_at_epoch": 0})]


class GroupFactors:
    """While active (a ``with`` block): every optimizer step scales each parameter group's rate
    by the factor the module gives it at the start of the phase — its ``configure_optimizers``
    rate divided by ``hparams.lr`` (head ``head_lr_mult``; backbone ``backbone_lr_mult``, 0 while
    frozen) — and restores the tuner's rate after the step (optimizer step hooks, so the tuner's
    scheduler and its record of the swept rate stay untouched)."""

    def __init__(self, module) -> None:
        built = module.configure_optimizers()
        optimizer = built["optimizer"] if isinstance(built, dict) else built
        base = float(module.hparams.lr)
        self.factors = [float(group["lr"]) / base for group in optimizer.param_groups]
        self.first_params = [group["params"][0] if group["params"] else None for group in optimizer.param_groups]
        self._saved: list[float] | None = None
        self._handles: list = []

    def _ours(self, optimizer) -> bool:
        groups = optimizer.param_groups
        return len(groups) == len(self.factors) and all(
            (not g["params"] and p is None) or (g["params"] and g["params"][0] is p)
            for g, p in zip(groups, self.first_params))

    def _scale(self, optimizer, args, kwargs) -> None:
        if self._ours(optimizer):
            self._saved = [group["lr"] for group in optimizer.param_groups]
            for group, factor in zip(optimizer.param_groups, self.factors):
                group["lr"] = group["lr"] * factor

    def _restore(self, optimizer, args, kwargs) -> None:
        if self._saved is not None and self._ours(optimizer):
            for group, lr in zip(optimizer.param_groups, self._saved):
                group["lr"] = lr
            self._saved = None

    def __enter__(self) -> "GroupFactors":
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self._handles = [register_optimizer_step_pre_hook(self._scale),
                         register_optimizer_step_post_hook(self._restore)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


@dataclass
class RangeTest:
    """The result of one phase's search: the swept ``mode.lr`` values, the smoothed losses, the
    suggestion (``None`` when the curve is too short) and the group factors it ran with."""

    phase: str
    lrs: list[float]
    losses: list[float]
    suggestion: float | None
    factors: list[float]
    plot: str = ""
    figure: Any = field(default=None, repr=False)  # Lightning's matplotlib figure of the curve, until saved

    def as_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "suggested_lr": self.suggestion, "group_factors": self.factors,
                "plot": self.plot, "lr": self.lrs,
                "loss": [loss if math.isfinite(loss) else None for loss in self.losses]}


def check_training_split(datamodule, min_batches: int) -> None:
    """A range test steps through ``num_training`` batches, cycling the training split: a split of
    fewer than ``min_batches`` full batches, or with a class of a single image, would repeat the
    same few images and measure how fast they are memorised, not a learning rate."""
    counts: dict[int, int] = {}
    for sample in datamodule.train_samples:
        counts[sample.label] = counts.get(sample.label, 0) + 1
    names = datamodule.class_names
    images = len(datamodule.train_samples)
    batches = images // datamodule.batch_size
    fewest = min(range(len(names)), key=lambda label: counts.get(label, 0))
    where = f"the training split of {printable(str(datamodule.root))}"
    if counts.get(fewest, 0) < 2:
        raise HymtlError(f"lr_find needs at least 2 training images per class; in {where} class "
                         f"{printable(names[fewest])} has {counts.get(fewest, 0)} ({images} images for {len(names)} "
                         "classes): use a folder with more images per class")
    if batches < int(min_batches):
        raise HymtlError(
            f"lr_find needs at least {min_batches} full batches of training images; {where} gives {batches} "
            f"({images} images, data.batch_size={datamodule.batch_size}): use more images or a smaller data.batch_size")


def range_test(phase: Phase, module, datamodule, trainer, settings: dict) -> RangeTest:
    """Run Lightning's tuner for ``phase`` with the group factors kept; the module's weights are
    restored by the tuner afterwards."""
    from lightning.pytorch.tuner import Tuner

    factors = GroupFactors(module)
    with factors:
        finder = Tuner(trainer).lr_find(
            module, datamodule=datamodule, min_lr=float(settings["min_lr"]), max_lr=float(settings["max_lr"]),
            num_training=int(settings["num_training"]), early_stop_threshold=settings.get("early_stop_threshold"),
            update_attr=False)
    if finder is None:
        raise HymtlError("the learning-rate finder did not run (trainer.fast_dev_run is set: remove it)")
    lrs, losses = list(finder.results["lr"]), [float(x) for x in finder.results["loss"]]
    suggestion = finder.suggestion() if len(losses) > 12 else None
    return RangeTest(phase.name, lrs, losses, suggestion, factors.factors,
                     figure=finder.plot(suggest=suggestion is not None))


def save_plot(test: RangeTest, path: Path, names: list[str]) -> None:
    """The loss-vs-``mode.lr`` curve with the suggestion marked, as a PNG (atomic write)."""
    from hymtl.figures import png_bytes, render
    from hymtl.fileio import atomic_write_bytes
    import matplotlib.pyplot as plt

    fig = test.figure
    ax = fig.axes[0]
    groups = ", ".join(f"{n} x{f:g}" for n, f in zip(names, test.factors))
    ax.set_xlabel(f"mode.lr (groups: {groups})")
    ax.set_ylabel("training loss (smoothed)")
    title = f"lr_find: {test.phase}"
    if test.suggestion is not None:
        ax.axvline(test.suggestion, color="#cf222e", linestyle="--", linewidth=1)
        title += f" — suggested mode.lr={test.suggestion:.2e}"
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    atomic_write_bytes(path, png_bytes(render(fig)))
    plt.close(fig)
    test.plot, test.figure = str(path), None


def paste_line(tests: list[RangeTest], backbone_lr_mult: float) -> str:
    """The overrides to paste: ``mode.lr=…``; for two phases also the ``mode.backbone_lr_mult``
    that gives the backbone the unfrozen phase's suggested rate while the head keeps the head
    phase's."""
    first = tests[0].suggestion
    line = f"mode.lr={first:.2e}"
    if len(tests) > 1 and tests[1].suggestion is not None:
        line += f" mode.backbone_lr_mult={backbone_lr_mult * tests[1].suggestion / first:.3g}"
    return line


def check_settings(settings: dict) -> None:
    """``lr_find.*``: a positive range, at least 13 steps (the suggestion skips 10 + 1 points)."""
    from hymtl.config import checked_number

    low = checked_number("lr_find.min_lr", settings["min_lr"], "number", 0, exclusive=True)
    high = checked_number("lr_find.max_lr", settings["max_lr"], "number", 0, exclusive=True)
    if high <= low:
        raise HymtlError(f"lr_find.max_lr must be above lr_find.min_lr, got {high} <= {low}")
    steps = checked_number("lr_find.num_training", settings["num_training"], "integer", 1)
    if steps < 13:  # Lightning's suggestion skips the first 10 points and the last one
        raise HymtlError("lr_find.num_training must be at least 13 (the suggestion skips the first 10 steps), "
                         f"got {steps}")
    checked_number("lr_find.min_batches", settings["min_batches"], "integer", 1)

