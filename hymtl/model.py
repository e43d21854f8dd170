"""``TransferModule``: a pretrained backbone plus a new classification head, as a LightningModule.

The three regimes are one parameter, ``unfreeze_at_epoch``:

* ``None`` — frozen feature extractor: the backbone never trains (``mode=frozen``);
* ``0`` — fine-tune everything from the first step (``mode=finetune``);
* ``k > 0`` — two-phase: head only for ``k`` epochs, then the backbone joins (``mode=two_phase``).

``trainable_stages=N`` makes any of them partial: "the backbone" that trains is then only its
top ``N`` named stages (:class:`hymtl.backbones.Stage`: ``layer3, layer4`` of a ResNet); the
prefix below them is frozen from construction on and never changes — ``requires_grad=False``
(so DDP never registers it and the optimizer never holds it) and eval mode (BatchNorm
statistics fixed). ``mode=partial`` fine-tunes the top stages from the first epoch;
``mode=two_phase mode.trainable_stages=2`` trains the head first, then the top two stages.

Freezing is module state, changed only by :meth:`freeze_backbone` / :meth:`unfreeze_backbone`.
A frozen backbone has ``requires_grad=False`` and its BatchNorm layers stay in eval mode
(running statistics untouched). The phase is derived from ``trainer.current_epoch`` at the
start of every training epoch, so a resumed run lands in the right phase (no callback state to
restore, unlike ``BackboneFinetuning``). The optimizer holds the backbone's parameter group from
the first step with a learning-rate factor of 0 until the switch, so no parameter group is
ever added mid-run and any scheduler state stays consistent.

A training loss that is not finite stops the run (:class:`NonFiniteLossError`) before the step
that would write non-finite weights, so no checkpoint of that epoch is ever written.

The constructor checks, steps, metrics and logging live in ``ClassificationModule``, shared
with the tutorial API's ``hymtl.tutorial.ClassifierModule`` (any ``nn.Module`` classifier
under the same steps).
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from hydra.utils import instantiate
from lightning.pytorch import LightningModule
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torchmetrics import MaxMetric, MeanMetric

from hymtl.backbones import Preprocessing, create_backbone
from hymtl.config import checked_number
from hymtl.depth_search import DepthSearch
from hymtl.errors import HymtlError, first_line, printable
from hymtl.features import FeatureBatch
from hymtl.loading import MAX_QUOTED, LoadError, check_weights, checked_description, checked_tensors, read_checkpoint
from hymtl.mixing import MixedBatch, make_mixer
from hymtl.tasks import make_task, tune_thresholds

class NonFiniteLossError(HymtlError):
    """The training loss became NaN or infinite: the run stops, no model of it is written."""


log = logging.getLogger(__name__)

DEFAULT_OPTIMIZER = {"_target_": "torch.optim.SGD", "momentum": 0.9}
DEFAULT_SCHEDULER = {"_target_": "hymtl.model.cosine_schedule"}


# --------------------------------------------------------------------------- LR schedules
# Schedules are epoch -> factor functions (instantiated from conf/, wrapped in LambdaLR).
# Plain closures on purpose: LambdaLR skips functions in its state dict, so checkpoints hold
# no custom objects and load with ``weights_only=True``.
def cosine_schedule(min_factor: float = 0.0) -> Callable[[int, int], float]:
    """Cosine decay from 1 to ``min_factor`` over the epochs of a phase."""

    def factor(epoch: int, total: int) -> float:
        progress = min(1.0, epoch / max(1, total))
        return min_factor + (1 - min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def step_schedule(step_size: int = 7, gamma: float = 0.1) -> Callable[[int, int], float]:
    """The tutorial's StepLR: multiply by ``gamma`` every ``step_size`` epochs."""

    def factor(epoch: int, total: int) -> float:
        return gamma ** (epoch // step_size)

    return factor


def constant_schedule() -> Callable[[int, int], float]:
    def factor(epoch: int, total: int) -> float:
        return 1.0

    return factor


class ClassificationModule(LightningModule):
    """Constructor checks, steps, torchmetrics and epoch logging shared by :class:`TransferModule`
    and the tutorial's ``ClassifierModule``.

    Subclasses call ``save_hyperparameters`` and then :meth:`init_classification` in ``__init__``,
    build the network, and define ``forward`` (preprocessed images -> logits) and
    ``configure_optimizers``. Logged per epoch: ``{train,val,test}/loss``, ``…/acc`` (micro: the
    fraction of images right), ``…/acc_macro`` and ``val/acc_best``.
    """

    def init_classification(
        self,
        num_classes: int,
        class_names: Sequence[str] | None,
        lr: float,
        head_lr_mult: float,
        optimizer: dict | None,
        scheduler: dict | None,
        label_smoothing: float = 0.0,
        task: dict | None = None,
        class_weights: Any = None,
        class_counts: Sequence[int] | None = None,
        train_images: int | None = None,
    ) -> None:
        """Check the arguments every classifier shares (positive learning rates, at least two
        classes, one name per class; names default to ``"0"``, ``"1"``, …), keep the optimizer and
        scheduler configs, the class names and the task as plain hyperparameters (checkpoints must
        load with ``weights_only=True``), and set up what the task asks for: the loss (weighted by
        ``class_weights``: ``"auto"`` from ``class_counts``, or a list) and the metrics."""
        checked_number("model.lr", lr)  # the one rule of each number: hymtl.config.NUMBER_RULES
        checked_number("model.head_lr_mult", head_lr_mult)
        largest = torch.finfo(torch.float32).max  # an SGD step on float32 weights takes lr as a float32
        if not math.isfinite(lr * head_lr_mult) or lr * head_lr_mult > largest:
            raise HymtlError(f"the head's learning rate lr * head_lr_mult = {lr * head_lr_mult:g} is too large for float32 "
                             f"weights (at most {largest:.3g}); lower mode.lr")
        if int(num_classes) < 2:
            raise HymtlError(f"need at least two classes, got {num_classes}")
        class_names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(num_classes)]
        if len(class_names) != num_classes:
            raise HymtlError(f"{len(class_names)} class names for {num_classes} classes")
        self.task = make_task(_plain(task))
        self.hparams.update(
            optimizer=_plain(optimizer or DEFAULT_OPTIMIZER),
            scheduler=_plain(scheduler or DEFAULT_SCHEDULER),
            class_names=class_names,
            task=self.task.describe(),
        )
        counts = list(class_counts) if class_counts is not None else None
        weights = self.task.loss_weights(counts, _plain(class_weights), images=train_images)
        self.init_metrics(num_classes, label_smoothing, weights)

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams.class_names)

    def frozen_modules(self) -> Sequence[nn.Module]:
        """The parts that do not train right now: kept in eval mode (BatchNorm statistics fixed)
        whatever ``train()`` says. Subclasses name them; none by default."""
        return ()

    def hold_frozen_in_eval(self) -> None:
        """Put :meth:`frozen_modules` in eval mode."""
        for module in self.frozen_modules():
            module.eval()

    def train(self, mode: bool = True) -> "ClassificationModule":
        # Lightning calls .train() at every epoch start and after validation: frozen parts stay in eval
        super().train(mode)
        self.hold_frozen_in_eval()
        return self

    @property
    def total_epochs(self) -> int:
        """The fit's ``max_epochs`` (1 outside a trainer or for an open-ended fit): schedules span it."""
        trainer = self._trainer
        return trainer.max_epochs if trainer is not None and trainer.max_epochs and trainer.max_epochs > 0 else 1

    def init_metrics(self, num_classes: int, label_smoothing: float = 0.0,
                     weights: torch.Tensor | None = None) -> None:
        """Loss and one metric object per stage (train/val/test) for ``num_classes`` classes, as
        the task says (:mod:`hymtl.tasks`); a multi-label task's decision thresholds as a buffer
        (saved with every checkpoint: what test, predict and export decide with)."""
        if not hasattr(self, "task"):
            self.task = make_task(None)
        self.criterion = self.task.loss(weights, label_smoothing)
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_metrics", self.task.metrics(num_classes, f"{stage}/"))
            setattr(self, f"{stage}_ranking", self.task.ranking_metrics(num_classes, f"{stage}/"))
        self.train_loss, self.val_loss, self.test_loss = MeanMetric(), MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()  # the best of val/<task.metric> (the attribute keeps its old name: checkpoints)
        self.val_acc_best.persistent(True)  # survives resume
        if self.task.multilabel:
            self.register_buffer("decision_threshold", torch.full((num_classes,), float(self.task.threshold)))
        self._val_outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def thresholds(self) -> torch.Tensor | None:
        """The multi-label decision threshold of each label (``None`` for one label per image)."""
        return getattr(self, "decision_threshold", None)

    def _shared_step(self, batch, stage: str) -> torch.Tensor:
        inputs, labels = batch[0], batch[-1]
        # a MixedBatch (mixup/cutmix, hymtl.mixing): the loss takes its mixed target vectors, the
        # metrics its hard labels
        mixed = isinstance(batch, MixedBatch)
        # a FeatureBatch holds the backbone's features of the images, computed once (hymtl.features)
        cached = batch.cached if mixed else isinstance(batch, FeatureBatch)
        logits = self(features=inputs) if cached else self(inputs)
        loss = self.criterion(logits, batch.targets if mixed else labels)
        detached = logits.detach()
        if stage == "val" and self.task.multilabel:
            self._val_outputs.append((self.task.probabilities(detached), labels.detach()))  # decided at epoch end
        else:
            getattr(self, f"{stage}_metrics").update(*self.task.metric_inputs(detached, labels, self.thresholds))
        ranking = getattr(self, f"{stage}_ranking")
        if ranking is not None:
            ranking.update(self.task.probabilities(detached), labels.int())
        getattr(self, f"{stage}_loss").update(loss.detach(), weight=labels.shape[0])
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        self.check_finite(loss, batch_idx)
        self.log("train/loss_step", loss, prog_bar=True)
        return loss

    def check_finite(self, loss: torch.Tensor, batch_idx: int) -> None:
        """Stop the run with :class:`NonFiniteLossError` when ``loss`` is NaN or infinite — before
        its backward pass and optimizer step, so the weights stay finite and no checkpoint of
        this epoch is written. Under DDP the ranks decide together (one rank's NaN stops all;
        a rank that stopped alone would leave the others waiting in the gradient sync)."""
        bad = not bool(torch.isfinite(loss.detach()).all())
        trainer = self._trainer
        if trainer is not None and trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            where = (f"epoch {trainer.current_epoch}, step {trainer.global_step} (batch {batch_idx})"
                     if trainer is not None else f"batch {batch_idx}")
            value = loss.detach().float().flatten()[0].item() if loss.numel() else float("nan")
            raise NonFiniteLossError(
                f"the training loss became {value} at {where}: stopped without saving this epoch; "
                "lower the learning rate (model.lr) or check the data for broken or extreme values")

    # Epoch metrics are logged as metric objects: Lightning computes them at the end of the
    # epoch (torchmetrics syncs their states across DDP ranks: the numbers of the whole split,
    # not of rank 0's shard) and resets them.
    def on_train_epoch_end(self) -> None:
        self.log("train/loss", self.train_loss)
        self._log_metrics("train")

    def _log_metrics(self, stage: str, prog_bar: bool = False) -> None:
        self.log_dict(getattr(self, f"{stage}_metrics"), prog_bar=prog_bar)
        ranking = getattr(self, f"{stage}_ranking")
        if ranking is not None:
            self.log_dict(ranking)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def _decide_validation(self) -> None:
        """Multi-label: with the whole split's probabilities (gathered from every rank), tune the
        thresholds when the task says so, then score the decisions at the kept thresholds."""
        if not self._val_outputs:
            return
        probabilities = torch.cat([p for p, _ in self._val_outputs])
        targets = torch.cat([t for _, t in self._val_outputs])
        self._val_outputs = []
        if self.task.tune and not self.trainer.sanity_checking:
            everything_p, everything_t = probabilities, targets
            if self.trainer.world_size > 1:  # ragged shards: pad-free gather of lists
                gathered = [None] * self.trainer.world_size
                torch.distributed.all_gather_object(gathered, (probabilities.cpu(), targets.cpu()))
                everything_p = torch.cat([g[0] for g in gathered])
                everything_t = torch.cat([g[1] for g in gathered])
            self.decision_threshold.copy_(tune_thresholds(everything_p.cpu(), everything_t.cpu()))
        self.val_metrics.update(*self.task.decisions(probabilities, targets, self.thresholds))

    def on_validation_epoch_end(self) -> None:
        self._decide_validation()
        monitored = self.task.metric
        if not self.trainer.sanity_checking:
            source = self.val_ranking if monitored not in self.val_metrics.keys(keep_base=True) else self.val_metrics
            self.last_val_metric = float(source[monitored].compute())  # synced: the same on every rank
            self.val_acc_best.update(source[monitored].compute())  # cached for the log below
            # a value, not the object (Lightning would reset the running max); identical on every
            # rank, so sync_dist only keeps Lightning from asking for it
            self.log(f"val/{monitored}_best", self.val_acc_best.compute(), sync_dist=True)
        self.log("val/loss", self.val_loss, prog_bar=True)
        self._log_metrics("val", prog_bar=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.log("test/loss", self.test_loss)
        self._log_metrics("test")

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self.task.probabilities(self(images))


def build_optimization(groups: list[dict], optimizer: dict, factors: list[Callable[[int], float]]) -> dict:
    """``configure_optimizers``' answer: the configured optimizer over ``groups`` and a per-epoch
    ``LambdaLR`` with one ``epoch -> factor`` function per group."""
    opt = instantiate(optimizer, _partial_=True)(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, factors)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class TransferModule(ClassificationModule):
    """Backbone + linear head for ``num_classes`` classes, with freeze/unfreeze hooks.

    Args:
        backbone: registry name (``resnet18``, ``efficientnet_lite0``, ``timm/<arch>``…).
        num_classes, class_names: the dataset's classes (sorted folder names); saved with checkpoints.
        pretrained, weights_path: ImageNet weights, or a local state-dict file.
        unfreeze_at_epoch: ``None`` frozen, ``0`` fine-tune, ``k`` two-phase (see module docstring).
        lr: the backbone's learning rate; the head trains at ``lr * head_lr_mult``
            (the tutorial's ``param_group``, 10x).
        backbone_lr_mult: extra factor for the backbone once unfrozen (two-phase: "a smaller rate").
        optimizer: a Hydra config (``_target_`` + kwargs) of a ``torch.optim`` optimizer.
        scheduler: a Hydra config of an ``epoch, total -> factor`` schedule (applied per phase).
        label_smoothing, dropout: head regularisation.
        task: the task's description (:mod:`hymtl.tasks`, ``conf/task/``): ``{"name": "multiclass"}``
            (default) or ``{"name": "multilabel", "threshold": 0.5}``.
        class_weights: ``None``, ``"auto"`` (inverse class frequency; multi-label: negatives /
            positives per label) or one weight per class; ``class_counts``, ``train_images``: the
            training images per class and in all, for ``"auto"`` (saved: a checkpoint rebuilds the
            same loss).
        trainable_stages: ``None`` the whole backbone trains when it trains; ``N`` only its top
            ``N`` named stages (partial fine-tuning), the prefix below them stays frozen. With
            ``depth_search``: the deepest the search may go.
        mixup, cutmix: the alpha of mixup / cutmix on the training batches (``0``: off; both:
            one of them per batch), images or cached features alike (:mod:`hymtl.mixing`).
        depth_search: ``None`` (the fixed regimes), or the arguments of
            :class:`hymtl.depth_search.DepthSearch` (``mode=auto``): the head first, then one more
            top stage per step while validation says it pays and the budget allows.
    """

    def __init__(
        self,
        backbone: str = "resnet18",
        num_classes: int = 2,
        class_names: Sequence[str] | None = None,
        pretrained: bool = True,
        weights_path: str | None = None,
        unfreeze_at_epoch: int | None = 0,
        lr: float = 1e-3,
        head_lr_mult: float = 10.0,
        backbone_lr_mult: float = 1.0,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        label_smoothing: float = 0.0,
        dropout: float = 0.0,
        channels_last: bool = True,
        trainable_stages: int | None = None,
        task: dict | None = None,
        class_weights: Any = None,
        class_counts: Sequence[int] | None = None,
        train_images: int | None = None,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        depth_search: dict | None = None,
    ):
        super().__init__()
        checked_number("model.backbone_lr_mult", backbone_lr_mult)  # hymtl.config.NUMBER_RULES
        if not math.isfinite(lr * backbone_lr_mult) or lr * backbone_lr_mult > torch.finfo(torch.float32).max:
            raise HymtlError(f"the backbone's learning rate lr * backbone_lr_mult = {lr * backbone_lr_mult:g} is too large "
                             f"for float32 weights (at most {torch.finfo(torch.float32).max:.3g}); lower mode.lr")
        if unfreeze_at_epoch is not None and backbone_lr_mult == 0:
            raise HymtlError(f"the backbone unfreezes at epoch {unfreeze_at_epoch} with backbone_lr_mult=0: it would "
                             "never change; set model.backbone_lr_mult > 0 (or mode=frozen to keep it frozen)")
        if unfreeze_at_epoch is not None:  # null: frozen
            checked_number("model.unfreeze_at_epoch", unfreeze_at_epoch)
        self.save_hyperparameters(ignore=["optimizer", "scheduler", "class_names", "task", "class_weights",
                                          "class_counts", "train_images", "depth_search"])
        self.hparams.update(class_weights=_plain(class_weights), train_images=train_images,
                            class_counts=list(class_counts) if class_counts is not None else None,
                            depth_search=_plain(depth_search))
        self.depth_search = self._depth_search(_plain(depth_search), unfreeze_at_epoch, trainable_stages)
        self.init_classification(num_classes, class_names, lr, head_lr_mult, optimizer, scheduler, label_smoothing,
                                 task=task, class_weights=class_weights, class_counts=class_counts,
                                 train_images=train_images)
        self.batch_mixer = make_mixer(mixup, cutmix)  # None when both are off

        built = create_backbone(backbone, pretrained=pretrained, weights_path=weights_path)
        self.backbone = built.model
        self.preprocessing: Preprocessing = built.preprocessing
        self.weights_source = built.weights
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(built.num_features, num_classes))
        self.backbone_frozen = False
        self.backbone_stages = built.stages
        self._built_backbone = built  # runs the backbone stage by stage (the prefix cache)
        self.trainable_stage_names, self._prefix_modules = self._split_stages(
            built, unfreeze_at_epoch, trainable_stages)

        self._training_stages: list[str] = list(self.trainable_stage_names)
        self._epoch_clock: float | None = None
        self._served_stages: int | None = None  # the cut the loaders serve now (forward_top_stages runs from it)
        if unfreeze_at_epoch is None:
            # never trains: freeze now, so DDP does not even register the backbone's parameters
            self.freeze_backbone()

    @staticmethod
    def _depth_search(settings: dict | None, unfreeze_at_epoch, trainable_stages) -> DepthSearch | None:
        if settings is None:
            return None
        if unfreeze_at_epoch != 0 or trainable_stages is None:
            raise HymtlError("the depth search (mode=auto) trains from the first epoch over the top trainable_stages "
                             f"stages: it needs unfreeze_at_epoch=0 and a number of stages, got {unfreeze_at_epoch} "
                             f"and {trainable_stages}")
        return DepthSearch(max_stages=trainable_stages, **settings)

    @property
    def has_phase_switch(self) -> bool:
        """Whether what trains changes during the fit (two-phase, the depth search): the loaders
        are rebuilt per epoch (what is served changes) and DDP must expect parameters without
        gradients. The one answer to that question (feature serving, DDP, early stopping ask it)."""
        return bool(self.hparams.unfreeze_at_epoch) or self.depth_search is not None

    def phase_start_epoch(self, epoch: int) -> int:
        """The epoch the phase that ``epoch`` belongs to began (early stopping's patience counts from it)."""
        if self.depth_search is not None:
            return self.depth_search.step_at(epoch).start_epoch
        return self.hparams.unfreeze_at_epoch or 0  # two-phase: the head-only epochs come before any phase

    def run_record(self) -> dict:
        """What the run summary keeps of the regime beyond the metrics (``metrics.json``)."""
        return {"depth_search": self.depth_search.summary()} if self.depth_search is not None else {}

    def _split_stages(self, built, unfreeze_at_epoch, trainable_stages) -> tuple[list[str], list[nn.Module]]:
        """The names of the stages that train when the backbone trains, and the modules of the
        prefix that never trains (frozen here, before any strategy wraps the model)."""
        names = built.stage_names()
        if trainable_stages is None:
            return names, []
        listing = f"its stages: {', '.join(names)}"
        if isinstance(trainable_stages, bool) or not isinstance(trainable_stages, int) or not (
                1 <= trainable_stages <= len(names)):
            raise HymtlError(f"model.trainable_stages must be an integer from 1 to {len(names)} for backbone "
                             f"{built.name} ({listing}), got {trainable_stages!r}")
        if unfreeze_at_epoch is None:
            raise HymtlError(f"model.trainable_stages={trainable_stages} with a frozen backbone "
                             "(unfreeze_at_epoch=null) trains nothing of it: use mode=partial, "
                             "or mode.trainable_stages=null")
        prefix = built.stages[: len(names) - trainable_stages]
        modules = [module for stage in prefix for module in stage.modules(self.backbone)]
        for stage in prefix:
            for param in stage.parameters(self.backbone):
                param.requires_grad_(False)
        for module in modules:
            module.eval()
        return names[len(prefix):], modules

    def trainable_backbone_parameters(self) -> list[nn.Parameter]:
        """The backbone's parameters that train when it trains: those of the top stages under
        partial fine-tuning, else all."""
        wanted = set(self.trainable_stage_names)
        return [param for stage in self.backbone_stages if stage.name in wanted
                for param in stage.parameters(self.backbone)]

    # ------------------------------------------------------------------ freezing
    def freeze_backbone(self) -> None:
        """Stop training the backbone: no gradients, BatchNorm statistics fixed (eval mode)."""
        self.backbone_frozen = True
        self.backbone.requires_grad_(False)
        self.backbone.eval()

    def unfreeze_backbone(self, stages: Sequence[str] | None = None) -> None:
        """Train the backbone again (gradients on, BatchNorm follows the module's mode) — under
        partial fine-tuning only its top stages (or ``stages`` of them: the depth search's step);
        the prefix stays frozen."""
        self.backbone_frozen = False
        self._training_stages = list(self.trainable_stage_names if stages is None else stages)
        wanted = set(self._training_stages)
        for stage in self.backbone_stages:
            if stage.name in self.trainable_stage_names:
                for param in stage.parameters(self.backbone):
                    param.requires_grad_(stage.name in wanted)
        self.backbone.train(self.training)
        self.hold_frozen_in_eval()

    def frozen_modules(self) -> Sequence[nn.Module]:
        if self.backbone_frozen:
            return (self.backbone,)
        waiting = [module for stage in self.backbone_stages
                   if stage.name in self.trainable_stage_names and stage.name not in self._training_stages
                   for module in stage.modules(self.backbone)]
        return tuple(self._prefix_modules) + tuple(waiting)

    def backbone_trains_at(self, epoch: int) -> bool:
        return bool(self.stages_training_at(epoch))

    def stages_training_at(self, epoch: int | None) -> list[str]:
        """The backbone stages that train at ``epoch`` (``None``: in the current step); empty:
        the backbone is frozen then."""
        start = self.hparams.unfreeze_at_epoch
        if start is None or (epoch is not None and epoch < start):
            return []
        if self.depth_search is None:
            return list(self.trainable_stage_names)
        count = self.depth_search.stages_at(epoch)
        return self.trainable_stage_names[len(self.trainable_stage_names) - count:] if count else []

    @property
    def fixed_prefix_stages(self) -> int:
        """How many leading backbone stages never train in this run: all of them when the
        backbone stays frozen, the stages below the trainable ones under partial fine-tuning."""
        if self.hparams.unfreeze_at_epoch is None:
            return len(self.backbone_stages)
        return len(self.backbone_stages) - len(self.trainable_stage_names)

    def cached_stages_at(self, epoch: int | None) -> int:
        """How many leading backbone stages give the same output for an image at training epoch
        ``epoch`` (``None``: evaluating the trained model), so their output may be served,
        computed once, instead of the image (:class:`hymtl.features.FeatureServer`); ``0``: images.

        All stages (the pooled features) while the whole backbone is frozen; under partial
        fine-tuning the frozen prefix, at every epoch (the top stages run on its activations
        in head-only epochs too: one cache for the whole run) — when the backbone can be run
        stage by stage (:attr:`hymtl.backbones.Backbone.can_split`), else images."""
        total = len(self.backbone_stages)
        if self.depth_search is not None:  # the cut follows the step
            trained = len(self.stages_training_at(epoch))
            if self._built_backbone.can_split:
                return total - self.depth_search.cut_depth(trained)
            return total if not trained else 0
        fixed = self.fixed_prefix_stages
        if fixed == total:
            return total
        if fixed > 0 and self._built_backbone.can_split:
            return fixed
        return total if epoch is not None and not self.backbone_trains_at(epoch) else 0

    def cached_prefix(self, stages: int) -> nn.Module:
        """The network whose output :meth:`cached_stages_at` serves: the backbone itself for all
        stages, else its first ``stages`` stages (:meth:`hymtl.backbones.Backbone.prefix`)."""
        if stages >= len(self.backbone_stages):
            return self.backbone
        return self._built_backbone.prefix(stages)

    def setup(self, stage: str) -> None:
        # Before the strategy wraps the model: DDP lays its gradient buckets out like the parameters.
        if self.hparams.channels_last:
            self.to(memory_format=torch.channels_last)

    def on_fit_start(self) -> None:
        # After the strategy has wrapped the model (DDP registers every parameter that may train).
        self._apply_phase(self.trainer.current_epoch)
        self._epoch_clock = time.monotonic()
        if self.depth_search is not None and self.trainer.is_global_zero:
            search = self.depth_search
            log.info("depth search (mode=auto) over the top %d stages of %s (%s): %d epoch%s per step, deeper "
                     "while val/%s gains more than %g%s", search.max_stages, self.hparams.backbone,
                     ", ".join(self.trainable_stage_names), search.step_epochs, "s" if search.step_epochs != 1 else "",
                     self.task.metric, search.margin,
                     f", within {search.budget:.0f} s" if search.budget else "")
        if self._prefix_modules and self.trainer.is_global_zero:
            names = [stage.name for stage in self.backbone_stages]
            frozen = names[: len(names) - len(self.trainable_stage_names)]
            log.info("partial fine-tuning of %s: stages %s train%s; %s stay frozen", self.hparams.backbone,
                     ", ".join(self.trainable_stage_names),
                     f" from epoch {self.hparams.unfreeze_at_epoch}" if self.hparams.unfreeze_at_epoch else "",
                     ", ".join(frozen))

    def on_train_epoch_start(self) -> None:
        self._apply_phase(self.trainer.current_epoch)

    def _apply_phase(self, epoch: int | None) -> None:
        stages = self.stages_training_at(epoch)
        if stages:
            if self.backbone_frozen or stages != self._training_stages:
                self.unfreeze_backbone(stages)
        elif not self.backbone_frozen:
            self.freeze_backbone()
        self._served_stages = self.cached_stages_at(epoch)

    def on_test_start(self) -> None:
        if self.depth_search is not None:
            self._apply_phase(None)  # the step of the checkpoint under test: what its loaders serve

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        trainer = self.trainer
        if self.depth_search is None or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        now = time.monotonic()
        seconds, self._epoch_clock = now - (self._epoch_clock or now), now
        if trainer.world_size > 1:  # one clock for every rank: the same decision everywhere
            seconds = trainer.strategy.broadcast(seconds, src=0)
        lines = self.depth_search.record(trainer.current_epoch, self.last_val_metric, seconds)
        if lines and trainer.is_global_zero:
            log.info("%s", lines)
        if self.depth_search.stopped:
            trainer.should_stop = True
        elif lines:
            self._refresh_learning_rates()

    def _refresh_learning_rates(self) -> None:
        """Set each group's rate for the next epoch again, from the schedule as it is now.
        Lightning steps epoch schedulers before validation, so the next epoch's rates were set
        before the search decided that a stage joins (its factor was still 0)."""
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
                rates = [base * factor(scheduler.last_epoch)
                         for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
                for group, rate in zip(scheduler.optimizer.param_groups, rates):
                    group["lr"] = rate
                scheduler._last_lr = rates

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.depth_search is not None:
            checkpoint["depth_search"] = self.depth_search.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.depth_search is not None and "depth_search" in checkpoint:
            self.depth_search.load_state_dict(checkpoint["depth_search"])

    # ------------------------------------------------------------------ forward / steps
    def forward_top_stages(self, activations: torch.Tensor) -> torch.Tensor:
        """The pooled features from the frozen prefix's activations: the stages above it."""
        total = len(self.backbone_stages)
        start = self._served_stages or self.fixed_prefix_stages
        activations = activations.to(self.head[1].weight.dtype)
        if self.hparams.channels_last:
            activations = activations.contiguous(memory_format=torch.channels_last)
        if self.backbone_frozen:
            with torch.no_grad():
                return self._built_backbone.run_stages(activations, start, total)
        return self._built_backbone.run_stages(activations, start, total)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        if self.backbone_frozen:
            with torch.no_grad():
                return self.backbone(images)
        return self.backbone(images)

    def forward(self, images: torch.Tensor | None = None, *, features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for a batch of preprocessed images ``(N, 3, H, W)``, or, given ``features=``,
        for what :mod:`hymtl.features` cached of a batch (its :class:`~hymtl.features.FeatureBatch`
        batches): the backbone's pooled features ``(N, F)`` (the head-only step), or the
        activations ``(N, C, H, W)`` of the frozen prefix (:attr:`fixed_prefix_stages`), which the
        top stages then run on."""
        if features is not None:
            if features.dim() > 2:
                features = self.forward_top_stages(features)
            return self.head(features.to(self.head[1].weight.dtype))
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)  # no-op when already
        return self.head(self.forward_features(images))

    # mixup / cutmix (mode.mixup, mode.cutmix: hymtl.mixing) of the training batches, on the device.
    # Not in on_after_batch_transfer: Lightning warns on every run whose module overrides that
    # hook beside a datamodule, mixing or not.
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        if self.batch_mixer is not None:
            batch = self.batch_mixer(batch[0], batch[-1], self.task, self.hparams.num_classes,
                                     cached=isinstance(batch, FeatureBatch))
        return super().training_step(batch, batch_idx)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        if self.depth_search is not None:
            return self._depth_search_optimization()
        hp = self.hparams
        groups = [{"params": list(self.head.parameters()), "lr": hp.lr * hp.head_lr_mult, "name": "head"}]
        if hp.unfreeze_at_epoch is not None:
            groups.append({"params": self.trainable_backbone_parameters(), "lr": hp.lr * hp.backbone_lr_mult,
                           "name": "backbone"})
        schedule = instantiate(hp.scheduler)
        total = self.total_epochs
        start = hp.unfreeze_at_epoch or 0

        def head_factor(epoch: int) -> float:
            return schedule(epoch, total)

        def backbone_factor(epoch: int) -> float:
            # lr 0 while frozen; then the schedule restarts for the backbone's own phase
            return 0.0 if epoch < start else schedule(epoch - start, max(1, total - start))

        return build_optimization(groups, hp.optimizer, [head_factor, backbone_factor][: len(groups)])

    def _depth_search_optimization(self) -> dict:
        """The head and one group per stage the search may reach; a stage's group sits at factor
        0 until its step, and every step restarts the schedule for the groups that train."""
        hp, search = self.hparams, self.depth_search
        schedule = instantiate(hp.scheduler)
        groups = [{"params": list(self.head.parameters()), "lr": hp.lr * hp.head_lr_mult, "name": "head"}]
        factors = [lambda epoch: schedule(*search.epoch_in_step(epoch))]
        names = list(reversed(self.trainable_stage_names))  # the top stage first: it joins at step 1
        stages = {stage.name: stage for stage in self.backbone_stages}
        for depth, name in enumerate(names, start=1):
            groups.append({"params": list(stages[name].parameters(self.backbone)), "lr": hp.lr * hp.backbone_lr_mult,
                           "name": f"backbone.{name}"})
            factors.append(lambda epoch, depth=depth: schedule(*search.epoch_in_step(epoch))
                           if search.stages_at(epoch) >= depth else 0.0)
        return build_optimization(groups, hp.optimizer, factors)


def _plain(cfg: Any) -> Any:
    """DictConfig/ListConfig -> dict/list: checkpoint hyperparameters must be plain containers."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg) if isinstance(cfg, dict) else cfg


# --------------------------------------------------------------------------- the module of a checkpoint
# hymtl.loading reads a checkpoint and checks what it can without the model (the file, its CRCs,
# weights-only unpickling, a plain description, finite tensors); what the description builds is
# known here, so the shapes it must have are computed here and the module is built here.
def verified_module_kwargs(checkpoint: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """The ``TransferModule`` arguments of a checkpoint (:func:`hymtl.loading.read_checkpoint`'s
    dict), once its description (hyperparameters: backbone, classes…) is shown to fit the
    tensors it holds.

    The module is first built on PyTorch's ``meta`` device (shapes only, no memory): every
    tensor it would have must be in the state dict with that shape, and every tensor must be
    finite (:func:`hymtl.loading.check_weights`), before anything is allocated. A file cannot ask
    for more memory than it holds (a 13 MB checkpoint claiming a million classes is refused in a
    second, not after GBs), and a non-finite weight is a damaged checkpoint, named as such.
    Raises :class:`~hymtl.loading.LoadError`."""
    path = Path(os.path.expanduser(str(path)))
    hparams = checked_description(checkpoint["hyper_parameters"], path)
    accepted = set(inspect.signature(TransferModule.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in hparams.items() if k in accepted}
    # the weights are in the checkpoint: never download or read a weights file to build the module
    kwargs.update(pretrained=False, weights_path=None)
    state_dict = checked_tensors(checkpoint["state_dict"], path)
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in TransferModule(**kwargs).state_dict().items()}
    except HymtlError as exc:
        raise LoadError(f"checkpoint {printable(path)}: {first_line(exc, MAX_QUOTED)}") from None
    except Exception as exc:  # a tampered hyperparameter of the wrong type
        raise LoadError(f"checkpoint {printable(path)}: invalid hyperparameters ({first_line(exc, MAX_QUOTED)})") from None
    check_weights(state_dict, expected, path, kwargs["backbone"], kwargs.get("num_classes"))
    return kwargs


def load_checkpoint(path: str | os.PathLike) -> TransferModule:
    """A :class:`TransferModule` from a Lightning checkpoint, in eval mode, fp32, on CPU.

    No code from the file runs (:mod:`hymtl.loading`); nothing is built before the description
    is shown to fit the tensors (:func:`verified_module_kwargs`). Raises
    :class:`~hymtl.loading.LoadError`.
    """
    checkpoint = read_checkpoint(path)
    path = Path(os.path.expanduser(str(path)))
    kwargs = verified_module_kwargs(checkpoint, path)
    try:
        model = TransferModule(**kwargs)
    except HymtlError as exc:
        raise LoadError(f"checkpoint {printable(path)}: {first_line(exc, MAX_QUOTED)}") from None
    except Exception as exc:  # a tampered hyperparameter of the wrong type
        raise LoadError(f"checkpoint {printable(path)}: invalid hyperparameters ({first_line(exc, MAX_QUOTED)})") from None
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise LoadError(
            f"checkpoint {printable(path)}: weights do not fit its {kwargs['backbone']} model ({detail[:MAX_QUOTED]})"
        ) from None
    model.float().eval()
    model.requires_grad_(False)
    return model
