"""An exponential moving average of the weights (EMA), as a callback: ``callbacks=ema``.

Built on Lightning's own :class:`~lightning.pytorch.callbacks.WeightAveraging` (Lightning 2.6;
``torch.optim.swa_utils.AveragedModel`` underneath), which already does what EMA needs in a
Lightning run: the average is updated after every optimizer step, swapped in for every
validation epoch (so ``val/acc``, the best checkpoint's choice and ``val/acc_best`` are the
EMA's), written as the checkpoint's ``state_dict`` (the training weights beside it under
``current_model_state``, the average's own counter under ``averaging_state``: what a resume
restores), and copied into the module when the fit ends. A checkpoint's ``state_dict`` — what
``trainer.test``, ``hymtl.eval``, ``hymtl.predict`` and ``hymtl.export`` read — is therefore
the EMA. timm's ``ModelEmaV3`` would need all of that written again around it.

Three things differ from Lightning's ``EMAWeightAveraging`` (why this subclass exists):

* **warm-up**: the decay of update ``n`` is ``min(decay, (1 + n) / (10 + n))`` (timm's
  ``ModelEmaV3`` warm-up). A fixed 0.999 over the ~300 optimizer steps of a 20-epoch ants/bees
  run would keep about 74 % of the *initial* weights in the average;
* **state that is not averaged**: the average is a copy of the whole module, so its
  torchmetrics states (``val/acc_best``'s running max) would be the copy's initial ``-inf`` in
  the checkpoint; they are taken from the training module;
* **loading outside a fit**: Lightning's ``on_load_checkpoint`` puts the training weights
  (``current_model_state``) back into the module whenever it finds them — also in
  ``trainer.test(ckpt_path=best)`` right after ``fit``, which would test the raw weights
  instead of the EMA. Here the training weights are restored only when a *fit* resumes.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

from hymtl.errors import HymtlError


class WarmupEMA:
    """``avg_fn`` of :class:`torch.optim.swa_utils.AveragedModel`: the EMA update with
    ``decay_n = min(decay, (1 + n) / (10 + n))`` for the ``n``-th update. A class, not a closure,
    so the callback pickles (DDP spawn)."""

    def __init__(self, decay: float) -> None:
        self.decay = float(decay)

    def __call__(self, averaged: torch.Tensor, current: torch.Tensor, num_averaged: torch.Tensor) -> torch.Tensor:
        n = float(num_averaged)
        decay = min(self.decay, (1.0 + n) / (10.0 + n))
        return averaged + (current - averaged) * (1.0 - decay)


class ExponentialMovingAverage(WeightAveraging):
    """EMA of the module's parameters and buffers, updated after every ``every_n_steps``-th
    optimizer step from step ``start_step`` on (see the module docstring for what it changes in a
    run).

    Args:
        decay: the EMA decay after warm-up, in ``[0, 1)``; 0.999 forgets with a half-life of
            about 700 steps, 0.99 of about 70.
        every_n_steps: update after every n-th optimizer step.
        start_step: the first optimizer step (0-based) that updates the average.
        device: where the average lives (``None``: the module's device).
    """

    def __init__(self, decay: float = 0.999, every_n_steps: int = 1, start_step: int = 0,
                 device: str | None = None) -> None:
        try:
            decay = float(decay)
        except (TypeError, ValueError):
            raise HymtlError(f"callbacks.ema.decay must be a number in [0, 1), got {decay!r}") from None
        if not 0.0 <= decay < 1.0:
            raise HymtlError(f"callbacks.ema.decay must be a number in [0, 1), got {decay}")
        if isinstance(every_n_steps, bool) or int(every_n_steps) != every_n_steps or every_n_steps < 1:
            raise HymtlError(f"callbacks.ema.every_n_steps must be a positive integer, got {every_n_steps!r}")
        if isinstance(start_step, bool) or int(start_step) != start_step or start_step < 0:
            raise HymtlError(f"callbacks.ema.start_step must be an integer >= 0, got {start_step!r}")
        super().__init__(device=device, use_buffers=True, avg_fn=WarmupEMA(decay))
        self.decay, self.every_n_steps, self.start_step = decay, int(every_n_steps), int(start_step)

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start_step and (
            (step_idx - self.start_step) % self.every_n_steps == 0)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        current = checkpoint.get("current_model_state")
        if current is None:
            return
        # only parameters and buffers are averaged; the rest of the module's state (torchmetrics'
        # persistent states: val/acc_best's running max) is the training module's, not the
        # average copy's never-updated initial value (-inf: an unreadable checkpoint)
        averaged = {name for name, _ in pl_module.named_parameters()} | {name for name, _ in pl_module.named_buffers()}
        for name, value in current.items():
            if name not in averaged:
                checkpoint["state_dict"][name] = value

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # the module holds the checkpoint's state_dict (the EMA) already: outside a fit, keep it
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
