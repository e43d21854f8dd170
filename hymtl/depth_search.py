"""The depth search of ``mode=auto``: progressive unfreezing driven by validation, within a budget.

The run goes deeper one backbone stage at a time: step 0 trains the head alone, step 1 the top
stage with it, step 2 the top two, … Every step runs ``step_epochs`` epochs and starts from the
weights the previous one ended with (one fit: the optimizer's parameter groups never change, a
stage's group sits at learning-rate factor 0 until its step). At the end of a step it decides:

Step 0 (the head on cached features, the cheapest epochs of the run) runs ``head_epochs``.

* **deeper**, while the step raised the best validation metric by more than ``margin`` (step 0
  has nothing to beat) and the next step fits in what is left of the time budget; also after a
  step that did not pay, ``patience`` times in a row (0 in ``mode=auto``: on the folders of
  ``benchmarks/depth.py`` the step after a flat one paid once in six);
* **stop** (the fit ends; the best checkpoint across every step is the run's model) when
  ``patience + 1`` steps in a row did not pay, when the next step would not fit the budget, or
  at ``max_stages``.

The cost of the next step is estimated from the measured cost of the steps so far: its epochs
at the measured seconds of the current step's epochs times :data:`DEEPER_EPOCH_COST` (one more
stage in the backward pass), plus, when the next step needs activations cut lower than those
cached, one more extraction (measured as the first epoch of step 0 less its other epochs).

This class is plain Python (no Lightning): :class:`hymtl.model.TransferModule` owns one, feeds it
each epoch's metric and seconds, asks it which stages train and what is served, and saves its
:meth:`state_dict` in every checkpoint (a resumed run continues the step it was in).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from hymtl.config import checked_number
from hymtl.errors import HymtlError

#: an epoch one stage deeper costs at most this many times the current step's (one more stage
#: in the forward and the backward pass; conservative: the budget is a ceiling)
DEEPER_EPOCH_COST = 2.0


@dataclass
class Step:
    """One step of the search: ``stages`` trained (0: the head alone) from ``start_epoch``."""

    stages: int
    start_epoch: int
    epoch_seconds: list[float] = field(default_factory=list)
    metrics: list[float] = field(default_factory=list)

    @property
    def epochs(self) -> int:
        return len(self.metrics)

    @property
    def best(self) -> float:
        return max(self.metrics) if self.metrics else -math.inf

    @property
    def seconds(self) -> float:
        return sum(self.epoch_seconds)

    def typical_epoch_seconds(self) -> float:
        """The median epoch, without the first (which may hold an extraction) when there are others."""
        later = self.epoch_seconds[1:] or self.epoch_seconds
        return statistics.median(later) if later else 0.0


class DepthSearch:
    """How deep to train, decided step by step from validation (see the module docstring).

    Args:
        max_stages: the deepest step (top stages trained with the head).
        step_epochs: epochs per step that trains backbone stages.
        head_epochs: epochs of step 0 (the head alone; ``None``: ``step_epochs``).
        margin: the least gain of the monitored validation metric for going one stage deeper.
        patience: how many steps in a row may gain no more than ``margin`` before the search
            stops (0: it stops at the first).
        budget: seconds for the whole fit (``None``: no limit), parsed by :func:`hymtl.config.checked_number`.
        first_cut: the activations served from the start are those below the top ``first_cut``
            stages: steps 0…``first_cut`` share one extraction (the frozen top stages run on
            them each epoch, which costs far less than extracting again); deeper steps extract
            at their own cut.
    """

    def __init__(self, max_stages: int, step_epochs: int = 12, margin: float = 0.005, budget: Any = None,
                 first_cut: int = 2, head_epochs: int | None = None, patience: int = 0):
        self.max_stages = checked_number("model.trainable_stages", max_stages, "integer", 1)
        self.step_epochs = checked_number("mode.depth_search.step_epochs", step_epochs, "integer", 1)
        self.head_epochs = self.step_epochs if head_epochs is None else checked_number(
            "mode.depth_search.head_epochs", head_epochs, "integer", 1)
        self.margin = checked_number("mode.depth_search.margin", margin, "number", -math.inf)  # < 0: deeper even when worse
        self.first_cut = checked_number("mode.depth_search.first_cut", first_cut, "integer", 1)
        self.patience = checked_number("mode.depth_search.patience", patience, "integer", 0)
        self.budget = None if budget is None else checked_number("budget", budget, "duration", 0, exclusive=True)
        self.steps: list[Step] = [Step(stages=0, start_epoch=0)]
        self.decision: str | None = None

    # ------------------------------------------------------------------ what runs when
    def step_at(self, epoch: int) -> Step:
        """The step that epoch ``epoch`` belongs to (the last one from there on)."""
        for step in reversed(self.steps):
            if epoch >= step.start_epoch:
                return step
        return self.steps[0]

    def stages_at(self, epoch: int | None) -> int:
        """Top stages that train at ``epoch`` (``None``: the current step's)."""
        return (self.steps[-1] if epoch is None else self.step_at(epoch)).stages

    def cut_depth(self, stages: int) -> int:
        """How many top stages run on the served activations when ``stages`` train."""
        return max(stages, min(self.first_cut, self.max_stages))

    def epochs_of(self, step: Step) -> int:
        """How many epochs ``step`` runs: ``head_epochs`` for the head alone, else ``step_epochs``."""
        return self.head_epochs if step.stages == 0 else self.step_epochs

    def epoch_in_step(self, epoch: int) -> tuple[int, int]:
        """``(epochs into its step, the step's length)``: what a per-step schedule needs."""
        step = self.step_at(epoch)
        return epoch - step.start_epoch, self.epochs_of(step)

    @property
    def elapsed(self) -> float:
        return sum(step.seconds for step in self.steps)

    # ------------------------------------------------------------------ the decision
    def record(self, epoch: int, metric: float, seconds: float) -> str | None:
        """Note epoch ``epoch``'s validation ``metric`` and wall ``seconds``; at the last epoch
        of a step, decide (:meth:`decide`) and return the lines to log; else ``None``."""
        step = self.step_at(epoch)
        if step is not self.steps[-1] or self.decision is not None:
            return None  # an epoch past the decision (a resumed run re-validating): nothing to decide
        step.metrics.append(float(metric))
        step.epoch_seconds.append(float(seconds))
        if step.epochs < self.epochs_of(step):
            return None
        return self.decide(epoch)

    def decide(self, epoch: int) -> str:
        """At the end of the current step (epoch ``epoch``): start the next step or stop."""
        step = self.steps[-1]
        earlier = max((s.best for s in self.steps[:-1]), default=None)
        gain = None if earlier is None else step.best - earlier
        flat = self.flat_steps()
        line = (f"depth search: step {len(self.steps) - 1} trained {_stages(step.stages)} for {_epochs(step.epochs)} "
                f"(epochs {step.start_epoch}-{epoch}): best val {step.best:.4f}"
                + ("" if gain is None else f" ({gain:+.4f} over the steps before)") + f", {step.seconds:.1f} s")
        if step.stages >= self.max_stages:
            self.decision = f"stopped at the deepest step allowed ({_stages(self.max_stages)})"
        elif gain is not None and gain <= self.margin and flat > self.patience:
            self.decision = f"stopped: going one stage deeper gained {gain:+.4f}, not more than the margin {self.margin:g}"
            if self.patience:
                self.decision += f", {_steps(flat)} in a row (patience {self.patience})"
        else:
            cost = self.next_step_seconds()
            left = None if self.budget is None else self.budget - self.elapsed
            if left is not None and cost > left:
                self.decision = (f"stopped: the next step ({_stages(step.stages + 1)}) would take ~{cost:.0f} s, "
                                 f"{max(left, 0):.0f} s of the budget {self.budget:.0f} s are left")
            else:
                self.steps.append(Step(stages=step.stages + 1, start_epoch=epoch + 1))
                why = "" if not flat else f" ({_steps(flat)} in a row without a gain over the margin; patience {self.patience})"
                return line + f"; going deeper{why}: {_stages(step.stages + 1)} from epoch {epoch + 1}" + (
                    f" (~{cost:.0f} s of {left:.0f} s left)" if left is not None else "")
        return line + "; " + self.decision

    def flat_steps(self) -> int:
        """How many steps in a row, ending with the last, raised the best validation metric of the
        steps before them by no more than ``margin``. Computed from the steps alone, so a resumed
        run counts as the interrupted one did."""
        steps, count = self.steps, 0
        for index in range(len(steps) - 1, 0, -1):
            if steps[index].best - max(s.best for s in steps[:index]) > self.margin:
                break
            count += 1
        return count

    def next_step_seconds(self) -> float:
        """The estimated wall time of one step deeper, from the steps measured so far."""
        step = self.steps[-1]
        cost = self.step_epochs * step.typical_epoch_seconds() * (DEEPER_EPOCH_COST if step.stages else 1.0)
        if self.cut_depth(step.stages + 1) != self.cut_depth(step.stages):  # activations cut lower: extract again
            first = self.steps[0]
            cost += max(0.0, (first.epoch_seconds[0] if first.epoch_seconds else 0.0) - first.typical_epoch_seconds())
        return cost

    @property
    def stopped(self) -> bool:
        return self.decision is not None

    def best_step(self) -> Step:
        return max(self.steps, key=lambda s: s.best)

    # ------------------------------------------------------------------ checkpoints and the record
    def state_dict(self) -> dict:
        """Plain containers (checkpoints load with ``weights_only=True``)."""
        return {"steps": [asdict(step) for step in self.steps], "decision": self.decision}

    def load_state_dict(self, state: dict) -> None:
        steps = state.get("steps") or []
        if not steps:
            raise HymtlError("the checkpoint's depth search holds no step")
        self.steps = [Step(**step) for step in steps]
        self.decision = state.get("decision")

    def summary(self) -> dict:
        """What ``metrics.json`` keeps under ``depth_search``: one entry per step and the decision."""
        best = self.best_step()
        return {
            "steps": [{"stages": s.stages, "start_epoch": s.start_epoch, "epochs": s.epochs,
                       "best_val": None if not s.metrics else s.best, "seconds": round(s.seconds, 2)}
                      for s in self.steps],
            "chosen_stages": best.stages,
            "decision": self.decision or "the run ended before the search decided (mode.epochs or a stop)",
            "budget_s": self.budget,
        }


def _epochs(n: int) -> str:
    return f"{n} epoch{'s' if n != 1 else ''}"


def _steps(n: int) -> str:
    return f"{n} step{'s' if n != 1 else ''}"


def _stages(n: int) -> str:
    return "the head alone" if n == 0 else f"the top {n} stage{'s' if n != 1 else ''}"
