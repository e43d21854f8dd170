"""The tutorial's pictures: predictions on a grid of images, and saving a figure."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
from matplotlib.figure import Figure
from torch import nn

from hymtl.backbones import Preprocessing
from hymtl.errors import HymtlError
from hymtl.figures import png_bytes, prediction_grid, render
from hymtl.fileio import atomic_write_bytes


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


def _normalize_of(loader: Any) -> tuple[Sequence[float], Sequence[float]] | None:
    """Mean and std of the ``Normalize`` in a loader's dataset transform, if there is one."""
    transform = getattr(getattr(loader, "dataset", None), "transform", None)
    for step in getattr(transform, "transforms", []) or []:
        if hasattr(step, "mean") and hasattr(step, "std"):
            return list(step.mean), list(step.std)
    return None


def _take(loader: Iterable, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The first ``count`` images of a loader (of ``(images, labels)`` or of images), with their
    labels where it has them."""
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


def save_figure(figure: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write ``figure`` as a PNG atomically; returns the path."""
    atomic_write_bytes(path, png_bytes(render(figure, dpi)))
    return Path(path)
