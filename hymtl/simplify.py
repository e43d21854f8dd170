"""Rewriting an eval-mode network into a cheaper one that computes the same outputs for a fixed input size.

Used where a frozen network only runs forward: :class:`hymtl.inference.TorchPredictor` (predict)
and :class:`hymtl.features.FeatureExtractor` (the frozen prefix whose outputs are cached).
Knows ``torch.nn`` and timm's layers; no data, no files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Simplified:
    """What :func:`simplify_for_inference` changed: batch norms folded into their convolutions,
    TensorFlow-style "same" convolutions given a static padding."""

    batch_norms_folded: int = 0
    static_same_paddings: int = 0

    def __str__(self) -> str:
        return f"{self.batch_norms_folded} batch norms folded, {self.static_same_paddings} same-paddings made static"


def simplify_for_inference(model: torch.nn.Module, example: torch.Tensor, atol: float = 1e-4):
    """``(model, Simplified)``: an eval-mode ``model`` rewritten for inputs of ``example``'s shape,
    computing the same outputs with fewer memory passes (1.5-2x faster on a CPU for lite0,
    ``benchmarks/predict_rate.py``):

    * each ``BatchNorm2d`` that receives exactly the tensor a ``Conv2d`` returned (each called
      once) is folded into that convolution (``torch.nn.utils.fusion.fuse_conv_bn_eval``); a plain
      batch norm becomes ``Identity``, timm's ``BatchNormAct2d`` keeps its dropout and activation;
    * each timm ``Conv2dSame`` (TensorFlow's "same" padding, recomputed and applied with a padded
      copy of its input in every call) becomes a plain ``Conv2d`` with the padding of the input size
      it was seen with (``timm.layers.padding.pad_same_arg``); an asymmetric padding (one more
      row or column at the end, as stride 2 gives) becomes a symmetric one and a kernel with one
      leading zero tap.

    What follows what and which sizes occur are observed in one forward pass over ``example``,
    not assumed. The rewriting is done on a copy and kept only when its outputs match the
    original's on a random batch of ``example``'s shape (max |diff| <= ``atol`` x (1 + max
    |output|): the rounding of folded weights); otherwise — a convolution whose output is also used
    elsewhere, say — ``model`` is returned unchanged with nothing simplified. The result computes
    the original's outputs only for inputs of ``example``'s height and width.
    """
    import copy

    import torch
    from torch import nn
    from torch.nn.utils import skip_init
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    try:
        from timm.layers import Conv2dSame
        from timm.layers.padding import pad_same_arg
    except ImportError:  # no timm: no timm layers to rewrite
        Conv2dSame, pad_same_arg = (), None

    if model.training:
        raise ValueError("a model is simplified for inference in eval mode only")
    candidate = copy.deepcopy(model)
    outputs: dict[int, tuple[nn.Module, torch.Tensor]] = {}  # id(conv output) -> (conv, output kept alive)
    pairs: list[tuple[nn.Module, nn.Module]] = []
    calls: dict[int, int] = {}
    input_sizes: dict[int, set[tuple[int, int]]] = {}

    def before_any(module, args):
        calls[id(module)] = calls.get(id(module), 0) + 1

    def before_conv(module, args):
        input_sizes.setdefault(id(module), set()).add(tuple(args[0].shape[-2:]))

    def after_conv(module, args, output):
        outputs[id(output)] = (module, output)

    def before_norm(module, args):
        if args and id(args[0]) in outputs and outputs[id(args[0])][1] is args[0]:
            pairs.append((outputs[id(args[0])][0], module))

    handles = []
    for module in candidate.modules():
        handles.append(module.register_forward_pre_hook(before_any))
        if isinstance(module, nn.Conv2d):
            handles += [module.register_forward_pre_hook(before_conv), module.register_forward_hook(after_conv)]
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(before_norm))
    try:
        with torch.inference_mode():
            candidate(example)
    finally:
        for handle in handles:
            handle.remove()
    outputs.clear()
    # every place that holds a module: its parents, and wrappers that keep a reference to a model
    # outside their submodules (hymtl.features.BackbonePrefix) must see the replacement too
    parents_of: dict[int, list[tuple[nn.Module, str]]] = {}
    seen, stack = set(), [candidate]
    while stack:
        parent = stack.pop()
        if id(parent) in seen:
            continue
        seen.add(id(parent))
        for name, child in [*parent.named_children(), *((k, v) for k, v in vars(parent).items()
                                                         if isinstance(v, nn.Module) and not k.startswith("__"))]:
            parents_of.setdefault(id(child), []).append((parent, name))
            stack.append(child)

    def replace(old: nn.Module, new: nn.Module) -> None:
        places = parents_of.pop(id(old))
        for parent, name in places:
            if name in parent._modules:
                parent._modules[name] = new
            else:
                object.__setattr__(parent, name, new)
        parents_of[id(new)] = places

    folded = 0
    for conv, norm in pairs:
        if calls[id(conv)] != 1 or calls[id(norm)] != 1 or norm.running_mean is None or id(norm) not in parents_of:
            continue
        if type(norm) is nn.BatchNorm2d:
            replacement = nn.Identity()
        elif isinstance(getattr(norm, "act", None), nn.Module) and isinstance(getattr(norm, "drop", None), nn.Module):
            replacement = nn.Sequential(norm.drop, norm.act)  # timm's BatchNormAct2d: norm, drop, act
        else:
            continue
        fused = fuse_conv_bn_eval(conv, norm)
        conv.weight, conv.bias = fused.weight, fused.bias
        replace(norm, replacement)
        folded += 1

    static = 0
    for conv in [m for m in candidate.modules() if isinstance(m, Conv2dSame)] if Conv2dSame else []:
        sizes = input_sizes.get(id(conv), set())
        if len(sizes) != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros" or id(conv) not in parents_of:
            continue
        left, right, top, bottom = pad_same_arg(list(next(iter(sizes))), list(conv.kernel_size), list(conv.stride))
        extra_h, extra_w = bottom - top, right - left
        if extra_h not in (0, 1) or extra_w not in (0, 1):
            continue
        # a leading zero tap moves each window one step right: symmetric padding + 1 covers the end
        weight = torch.nn.functional.pad(conv.weight.detach(), (extra_w, 0, extra_h, 0))
        # skip_init: no weight initialisation, which would draw from the global RNG (a run that
        # extracts features would then shuffle differently from one that reads them)
        plain = skip_init(nn.Conv2d, conv.in_channels, conv.out_channels, tuple(weight.shape[-2:]), conv.stride,
                          padding=(top + extra_h, left + extra_w), groups=conv.groups, bias=conv.bias is not None,
                          device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if conv.bias is not None:
                plain.bias.copy_(conv.bias)
        replace(conv, plain)
        static += 1

    if not (folded or static):
        return model, Simplified()
    probe = torch.randn(example.shape, generator=torch.Generator().manual_seed(0)).to(example.device)
    with torch.inference_mode():
        expected, got = model(probe).float(), candidate(probe).float()
    if expected.shape != got.shape or not bool(((expected - got).abs().max() <= atol * (1 + expected.abs().max())).item()):
        return model, Simplified()
    return candidate, Simplified(folded, static)
