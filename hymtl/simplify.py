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

    if model.training:
        raise ValueError("a model is simplified for inference in eval mode only")
    candidate = copy.deepcopy(model)
    seen = _observe(candidate, example)
    places = _Places(candidate)
    folded = _fold_batch_norms(seen, places)
    static = _static_same_paddings(candidate, seen, places)
    if not (folded or static):
        return model, Simplified()
    probe = torch.randn(example.shape, generator=torch.Generator().manual_seed(0)).to(example.device)
    with torch.inference_mode():
        expected, got = model(probe).float(), candidate(probe).float()
    if expected.shape != got.shape or not bool(((expected - got).abs().max() <= atol * (1 + expected.abs().max())).item()):
        return model, Simplified()
    return candidate, Simplified(folded, static)


@dataclass
class _Observed:
    """What one forward pass showed: each (conv, batch norm) pair where the norm receives exactly
    the conv's output, how often each module ran, and the input sizes each conv saw."""

    pairs: list
    calls: dict
    input_sizes: dict


def _observe(model: torch.nn.Module, example: torch.Tensor) -> _Observed:
    """Run ``model`` once over ``example`` with hooks that record what follows what."""
    import torch
    from torch import nn

    outputs: dict = {}  # id(conv output) -> (conv, output kept alive)
    seen = _Observed(pairs=[], calls={}, input_sizes={})

    def before_any(module, args):
        seen.calls[id(module)] = seen.calls.get(id(module), 0) + 1

    def before_conv(module, args):
        seen.input_sizes.setdefault(id(module), set()).add(tuple(args[0].shape[-2:]))

    def after_conv(module, args, output):
        outputs[id(output)] = (module, output)

    def before_norm(module, args):
        if args and id(args[0]) in outputs and outputs[id(args[0])][1] is args[0]:
            seen.pairs.append((outputs[id(args[0])][0], module))

    handles = []
    for module in model.modules():
        handles.append(module.register_forward_pre_hook(before_any))
        if isinstance(module, nn.Conv2d):
            handles += [module.register_forward_pre_hook(before_conv), module.register_forward_hook(after_conv)]
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(before_norm))
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return seen


class _Places:
    """Every place that holds each module of a network: its parents, and wrappers that keep a
    reference to a network outside their submodules (:class:`hymtl.backbones.BackbonePrefix`),
    so that a replacement is seen everywhere."""

    def __init__(self, root: torch.nn.Module):
        from torch import nn

        self.of: dict[int, list] = {}
        done, stack = set(), [root]
        while stack:
            parent = stack.pop()
            if id(parent) in done:
                continue
            done.add(id(parent))
            for name, child in [*parent.named_children(), *((k, v) for k, v in vars(parent).items()
                                                             if isinstance(v, nn.Module) and not k.startswith("__"))]:
                self.of.setdefault(id(child), []).append((parent, name))
                stack.append(child)

    def __contains__(self, module) -> bool:
        return id(module) in self.of

    def replace(self, old: torch.nn.Module, new: torch.nn.Module) -> None:
        places = self.of.pop(id(old))
        for parent, name in places:
            if name in parent._modules:
                parent._modules[name] = new
            else:
                object.__setattr__(parent, name, new)
        self.of[id(new)] = places


def _fold_batch_norms(seen: _Observed, places: _Places) -> int:
    """Fold each batch norm that follows a conv (each run once) into it; how many were folded."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for conv, norm in seen.pairs:
        if seen.calls[id(conv)] != 1 or seen.calls[id(norm)] != 1 or norm.running_mean is None or norm not in places:
            continue
        if type(norm) is nn.BatchNorm2d:
            replacement = nn.Identity()
        elif isinstance(getattr(norm, "act", None), nn.Module) and isinstance(getattr(norm, "drop", None), nn.Module):
            replacement = nn.Sequential(norm.drop, norm.act)  # timm's BatchNormAct2d: norm, drop, act
        else:
            continue
        fused = fuse_conv_bn_eval(conv, norm)
        conv.weight, conv.bias = fused.weight, fused.bias
        places.replace(norm, replacement)
        folded += 1
    return folded


def _static_same_paddings(model: torch.nn.Module, seen: _Observed, places: _Places) -> int:
    """Replace each timm ``Conv2dSame`` seen at one input size by a plain conv with that size's
    padding (an asymmetric one: symmetric + a leading zero tap); how many were replaced."""
    import torch
    from torch import nn
    from torch.nn.utils import skip_init

    try:
        from timm.layers import Conv2dSame
        from timm.layers.padding import pad_same_arg
    except ImportError:  # no timm: no timm layers to rewrite
        return 0
    static = 0
    for conv in [m for m in model.modules() if isinstance(m, Conv2dSame)]:
        sizes = seen.input_sizes.get(id(conv), set())
        if len(sizes) != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros" or conv not in places:
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
        places.replace(conv, plain)
        static += 1
    return static
