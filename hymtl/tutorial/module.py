"""The tutorial's LightningModule: any ``nn.Module`` classifier under the project's steps and metrics."""

from __future__ import annotations

from typing import Sequence

import torch
from hydra.utils import instantiate
from torch import nn

from hymtl.errors import HymtlError
from hymtl.model import ClassificationModule, build_optimization


class ClassifierModule(ClassificationModule):
    """Any ``nn.Module`` classifier (images -> logits) trained by Lightning with the project's
    steps and metrics: the tutorial API's module (:func:`train_fine_tuning`).

    The network is the user's (torchvision, timm, their own). What trains is the network's
    own ``requires_grad`` state, read when the optimizer is built: frozen parameters are left
    out, which is the fixed-feature-extractor scenario.

    Args:
        net: the classifier.
        num_classes, class_names: its classes (names default to ``"0"``, ``"1"``, …).
        lr: learning rate of every trainable parameter outside the head.
        head_parameters: the head's parameters, trained at ``lr * head_lr_mult`` (the
            tutorial's ``param_group=True``); ``None``: one group, every trainable parameter at ``lr``.
        optimizer, scheduler: Hydra configs as for :class:`~hymtl.model.TransferModule` (default: SGD with
            momentum 0.9, cosine decay over the run).
        frozen_batchnorm_eval: keep BatchNorm layers whose parameters are all frozen in eval
            mode (running statistics untouched, as a frozen ``TransferModule`` backbone);
            ``False``: every layer follows ``train()``, as in the original tutorial.
        loss_reduction: ``"mean"``, or ``"sum"`` to backpropagate the batch's summed loss as the
            original tutorial's ``train_ch13`` does (the logged loss stays the per-image mean).
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        lr: float = 1e-3,
        head_parameters: Sequence[nn.Parameter] | None = None,
        head_lr_mult: float = 10.0,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        label_smoothing: float = 0.0,
        frozen_batchnorm_eval: bool = True,
        loss_reduction: str = "mean",
    ):
        super().__init__()
        if loss_reduction not in ("mean", "sum"):
            raise HymtlError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.save_hyperparameters(ignore=["net", "head_parameters", "optimizer", "scheduler", "class_names"])
        self.init_classification(num_classes, class_names, lr, head_lr_mult, optimizer, scheduler, label_smoothing)
        self.net = net
        # names, not objects: they survive .to(device) and state-dict round trips
        self.head_names: set[str] | None = None
        if head_parameters is not None:
            wanted = {id(p) for p in head_parameters}
            self.head_names = {n for n, p in net.named_parameters() if id(p) in wanted}
            if len(self.head_names) != len(wanted):
                raise HymtlError("head_parameters must be parameters of net")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of preprocessed images."""
        return self.net(images)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * batch[-1].numel() if self.hparams.loss_reduction == "sum" else loss

    def frozen_modules(self) -> list[nn.Module]:
        """BatchNorm layers whose parameters are all frozen (with ``frozen_batchnorm_eval``)."""
        if not self.hparams.frozen_batchnorm_eval:
            return []
        frozen = []
        for module in self.net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                params = list(module.parameters(recurse=False))
                if params and not any(p.requires_grad for p in params):
                    frozen.append(module)
        return frozen

    def on_train_epoch_start(self) -> None:
        # Lightning leaves the user's modes alone at fit start (it restores them around validation)
        self.hold_frozen_in_eval()

    def configure_optimizers(self):
        hp = self.hparams
        trainable = [(n, p) for n, p in self.net.named_parameters() if p.requires_grad]
        if not trainable:
            raise HymtlError("no parameter of the network requires grad: nothing to train")
        head_names = self.head_names or set()
        body = [p for n, p in trainable if n not in head_names]
        head = [p for n, p in trainable if n in head_names]
        groups = [g for g in (
            {"params": body, "lr": hp.lr, "name": "body"},
            {"params": head, "lr": hp.lr * hp.head_lr_mult, "name": "head"},
        ) if g["params"]]
        schedule = instantiate(hp.scheduler)
        total = self.total_epochs
        return build_optimization(groups, hp.optimizer, [lambda epoch: schedule(epoch, total)] * len(groups))
