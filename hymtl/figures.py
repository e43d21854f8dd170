"""Matplotlib figures shared by TensorBoard logging and the tutorial API.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot state), so they work
headless, in notebooks, and inside Lightning callbacks alike.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch
from matplotlib.figure import Figure

CORRECT_COLOR = "#1a7f37"
WRONG_COLOR = "#cf222e"


def denormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo ``Normalize(mean, std)``: ``(N, 3, H, W)`` -> values in ``[0, 1]``."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.detach().float().cpu() * std_t + mean_t).clamp(0, 1)


def prediction_grid(
    images: torch.Tensor,
    probs: torch.Tensor,
    class_names: Sequence[str],
    labels: torch.Tensor | None = None,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    num_rows: int = 2,
    num_cols: int = 4,
    scale: float = 2.0,
) -> Figure:
    """The tutorial's grid: each image with its predicted label and confidence; where ``labels``
    are known, the true label too, the title green when right and red when wrong.

    Args:
        images: normalised ``(N, 3, H, W)`` batch (as fed to the model).
        probs: ``(N, C)`` class probabilities.
        labels: ``(N,)`` true class indices, or ``None``.
        mean, std: the normalisation to undo for display.
        num_rows, num_cols, scale: grid shape and inches per cell (the tutorial's ``scale``).
    """
    shown = images[: num_rows * num_cols]
    pixels = denormalize(shown, mean, std).permute(0, 2, 3, 1).numpy()
    confidence, predicted = probs[: len(shown)].float().max(dim=-1)
    fig = Figure(figsize=(num_cols * scale, num_rows * (scale + 0.35)), layout="constrained")
    axes = fig.subplots(num_rows, num_cols, squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index >= len(shown):
            continue
        ax.imshow(pixels[index])
        pred = int(predicted[index])
        title = f"{class_names[pred]} ({confidence[index]:.0%})"
        color = "black"
        if labels is not None:
            true = int(labels[index])
            title += f"\ntrue: {class_names[true]}"
            color = CORRECT_COLOR if true == pred else WRONG_COLOR
        ax.set_title(title, color=color, fontsize=9)
    return fig


def confusion_matrix_figure(
    matrix: torch.Tensor | Sequence[Sequence[int]],
    class_names: Sequence[str],
    title: str = "confusion matrix",
    scale: float = 1.1,
) -> Figure:
    """Counts of (true, predicted) pairs: rows are the true classes, columns the predictions.

    Each cell shows its count and its share of the row (the class's recall on the diagonal);
    the colour follows the row share, so classes of very different sizes stay comparable.
    """
    counts = torch.as_tensor(matrix, dtype=torch.float64)
    rows = counts.sum(dim=1, keepdim=True)
    share = torch.where(rows > 0, counts / rows.clamp(min=1), torch.zeros_like(counts))
    n = len(class_names)
    size = max(3.2, 1.2 + scale * n)
    fig = Figure(figsize=(size + 0.8, size), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(share.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), labels=list(class_names), rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center")
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(n):
        for j in range(n):
            dark = share[i, j] > 0.5  # white text on dark cells
            ax.text(j, i, f"{int(counts[i, j])}\n{share[i, j]:.0%}", ha="center", va="center",
                    fontsize=9, color="white" if dark else "black")
    return fig


def most_wrong_grid(
    images: torch.Tensor,
    probs: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    num_cols: int = 4,
    scale: float = 2.0,
) -> Figure:
    """The misclassified images the model was most sure about, most confident first.

    ``images``/``probs``/``labels`` are the wrong predictions already chosen (and ordered) by
    the caller; with none, the figure says so (a dashboard keeps the same tags every run).
    """
    if len(images) == 0:
        fig = Figure(figsize=(num_cols * scale, scale), layout="constrained")
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=12, color=CORRECT_COLOR)
        return fig
    num_cols = min(num_cols, len(images))
    num_rows = -(-len(images) // num_cols)
    fig = prediction_grid(images, probs, class_names, labels=labels, mean=mean, std=std,
                          num_rows=num_rows, num_cols=num_cols, scale=scale)
    fig.suptitle("most confidently wrong", color=WRONG_COLOR)
    return fig


def epoch_curves(
    series: Mapping[str, Sequence[float]],
    title: str | None = None,
    markers: Mapping[float, str] | None = None,
    xlabel: str = "epoch",
    size: tuple[float, float] = (5.0, 3.5),
) -> Figure:
    """Per-epoch curves on one axis, as the tutorial's animator draws them (``train loss``,
    ``train acc``, ``test acc``): epoch ``1..n`` on x, each legend entry with its last value.

    Args:
        series: name -> one value per epoch (``nan`` where an epoch has none).
        markers: x position -> label of a dashed vertical line (e.g. where a backbone unfreezes).
    """
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.subplots()
    styles = ("-", "--", "-.", ":")
    top = 1.0
    for index, (name, values) in enumerate(series.items()):
        values = [float(v) for v in values]
        if not values:
            continue
        epochs = range(1, len(values) + 1)
        ax.plot(epochs, values, styles[index % len(styles)], marker="o", markersize=3,
                label=f"{name} ({values[-1]:.3f})")
        top = max([top] + [v for v in values if math.isfinite(v)])
    for x, label in (markers or {}).items():
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.annotate(label, (x, 0.0), xycoords=("data", "axes fraction"), xytext=(3, 4),
                    textcoords="offset points", fontsize=8, color="grey")  # the curves rarely go there
    longest = max((len(v) for v in series.values()), default=1)
    ax.set_xlim(0.8, max(longest, 1) + 0.2)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(0.0, top * 1.05)
    ax.set_xlabel(xlabel)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return fig
