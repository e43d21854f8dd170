"""Matplotlib figures shared by TensorBoard logging and the tutorial API.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot state), so they work
headless, in notebooks, and inside Lightning callbacks alike.
"""

from __future__ import annotations

from typing import Sequence

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
