"""Matplotlib figures shared by TensorBoard logging and the tutorial API.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot state), so they work
headless, in notebooks, and inside Lightning callbacks alike.
"""

from __future__ import annotations

import io
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

CORRECT_COLOR = "#1a7f37"
WRONG_COLOR = "#cf222e"


def render(fig: Figure, dpi: float = 100) -> np.ndarray:
    """``fig`` drawn once, as ``(H, W, 3)`` uint8 pixels: what both TensorBoard and the PNG file
    get (drawing is most of a figure's cost; ``savefig`` and ``add_figure`` would each draw it)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.array(canvas.buffer_rgba())[..., :3]


def png_bytes(pixels: np.ndarray) -> bytes:
    """``(H, W, 3)`` uint8 pixels as a PNG file's bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


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


#: the most classes a confusion heat map shows; with more, the most confused ones (and the
#: top confused pairs beside them): the picture stays bounded, the full matrix is in the JSON
MAX_HEATMAP_CLASSES = 40
#: cells are annotated with their count and share up to this many classes (text per cell is
#: the slow part of drawing, and unreadable in small cells)
MAX_ANNOTATED_CLASSES = 20
#: the longest class name drawn on an axis (longer ones are cut with "…")
MAX_LABEL_CHARS = 24


def _short(name: str, limit: int = MAX_LABEL_CHARS) -> str:
    name = str(name)
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _counts_and_share(matrix: torch.Tensor | Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.as_tensor(matrix, dtype=torch.float64)
    rows = counts.sum(dim=1, keepdim=True)
    share = torch.where(rows > 0, counts / rows.clamp(min=1), torch.zeros_like(counts))
    return counts, share


def most_confused_classes(matrix: torch.Tensor | Sequence[Sequence[int]], limit: int = MAX_HEATMAP_CLASSES) -> list[int]:
    """The indices (ascending) of the ``limit`` classes involved in the most mistakes, as the
    true class or as the prediction; ties (and a matrix without mistakes) by support, then index."""
    counts = torch.as_tensor(matrix, dtype=torch.float64)
    n = counts.shape[0]
    if n <= limit:
        return list(range(n))
    off = counts.clone()
    off.fill_diagonal_(0)
    mistakes = off.sum(dim=0) + off.sum(dim=1)
    support = counts.sum(dim=1)
    # one sort key: mistakes first, support second, lower index last (stable sort keeps index order)
    order = sorted(range(n), key=lambda i: (-float(mistakes[i]), -float(support[i]), i))
    return sorted(order[:limit])


def confused_pairs(matrix: torch.Tensor | Sequence[Sequence[int]], class_names: Sequence[str],
                   top: int = 20) -> list[dict[str, Any]]:
    """The ``top`` most frequent mistakes, most frequent first: ``{"true", "predicted", "count",
    "share"}`` (``share``: of the true class's images). Only pairs that occurred; ties by index."""
    counts, share = _counts_and_share(matrix)
    off = counts.clone()
    off.fill_diagonal_(0)
    n = off.shape[0]
    flat = off.flatten()
    k = min(int(top), int((flat > 0).sum()))
    if k <= 0:
        return []
    # topk over n*n values is linear; ties are broken by position (true, then predicted index)
    position = torch.arange(flat.numel(), dtype=torch.float64)
    score = flat * (flat.numel() + 1) - position
    picked = score.topk(k).indices.tolist()
    return [{"true": str(class_names[i // n]), "predicted": str(class_names[i % n]),
             "count": int(flat[i]), "share": float(share[i // n, i % n])} for i in picked]


def _draw_confused_pairs(ax, pairs: Sequence[Mapping[str, Any]], title: str) -> None:
    ax.set_title(title, fontsize=10)
    if not pairs:
        ax.axis("off")
        ax.text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=12, color=CORRECT_COLOR)
        return
    labels = [f"{_short(p['true'])} → {_short(p['predicted'])}" for p in pairs]
    values = [p["count"] for p in pairs]
    positions = range(len(pairs))
    ax.barh(positions, values, color=WRONG_COLOR, alpha=0.8)
    ax.set_yticks(positions, labels=labels, fontsize=8)
    ax.invert_yaxis()  # most frequent on top
    for y, pair in zip(positions, pairs):
        ax.annotate(f" {pair['count']} ({pair['share']:.0%})", (pair["count"], y), va="center", fontsize=8)
    ax.set_xlim(0, max(values) * 1.25)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("images (share of the true class)")


def confused_pairs_figure(pairs: Sequence[Mapping[str, Any]], title: str = "most confused pairs (true → predicted)") -> Figure:
    """A bar per pair of :func:`confused_pairs`, most frequent on top; bounded by the pairs' count."""
    fig = Figure(figsize=(7.0, max(2.0, 0.8 + 0.3 * len(pairs))), layout="constrained")
    _draw_confused_pairs(fig.subplots(), pairs, title)
    return fig


def confusion_matrix_figure(
    matrix: torch.Tensor | Sequence[Sequence[int]],
    class_names: Sequence[str],
    title: str = "confusion matrix",
    scale: float = 1.1,
    max_classes: int = MAX_HEATMAP_CLASSES,
    top_pairs: int = 20,
) -> Figure:
    """Counts of (true, predicted) pairs: rows are the true classes, columns the predictions.

    The colour follows the row share (the class's recall on the diagonal), so classes of very
    different sizes stay comparable; up to :data:`MAX_ANNOTATED_CLASSES` classes each cell also
    shows its count and share. The picture is bounded whatever the class count: beyond
    ``max_classes`` classes it shows the ``max_classes`` most confused ones
    (:func:`most_confused_classes`, shares still of the whole row) and, beside them, the
    ``top_pairs`` most frequent mistakes (:func:`confused_pairs`). Cells shrink so the side
    stays under about 16 inches (1600 px at the 100 dpi the PNGs are written with).
    """
    counts, share = _counts_and_share(matrix)
    total = len(class_names)
    shown = most_confused_classes(counts, max_classes)
    capped = len(shown) < total
    if capped:
        index = torch.as_tensor(shown)
        counts, share = counts[index][:, index], share[index][:, index]
        title = f"{title}: the {len(shown)} most confused of {total} classes"
    names = [_short(class_names[i]) for i in shown]
    n = len(names)
    size = min(max(3.2, 1.2 + scale * n), 16.0)
    label_size = 9 if n <= 12 else 7
    width = size + 0.8 + (8.0 if capped else 0.0)
    fig = Figure(figsize=(width, size), layout="constrained")
    if capped:
        ax, pairs_ax = fig.subplots(1, 2, width_ratios=[size + 0.8, 8.0])
    else:
        ax = fig.subplots()
    image = ax.imshow(share.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), labels=names, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center",
                  fontsize=label_size)
    ax.set_yticks(range(n), labels=names, fontsize=label_size)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= MAX_ANNOTATED_CLASSES:
        for i in range(n):
            for j in range(n):
                dark = share[i, j] > 0.5  # white text on dark cells
                ax.text(j, i, f"{int(counts[i, j])}\n{share[i, j]:.0%}", ha="center", va="center",
                        fontsize=9 if n <= 12 else 6, color="white" if dark else "black")
    if capped:
        pairs = confused_pairs(matrix, class_names, top_pairs)
        _draw_confused_pairs(pairs_ax, pairs, f"the {len(pairs)} most frequent mistakes (true → predicted)")
    return fig


class ClassSpreadSample:
    """A seeded sample of ``size`` items spread over their true classes, kept while batches
    stream by, in bounded memory (at most ``size`` items' rows plus ``size`` keys per class).

    Each item gets a random key (float64, drawn from ``seed`` in arrival order: the same stream
    gives the same sample). The sample is what a round-robin deals: in a seeded order of the classes, the
    lowest-key item of each class, then the second lowest of each, and so on: the first
    ``size`` of that order. An item that drops out of it can never come back (later items only
    push it further down), which is why the stream needs to keep no more than ``size`` rows.
    """

    def __init__(self, size: int, num_classes: int, seed: int = 0) -> None:
        self.size = int(size)
        self._generator = torch.Generator().manual_seed(int(seed))
        self._class_order = torch.randperm(max(int(num_classes), 1), generator=self._generator).tolist()
        self._keys: dict[int, list[float]] = {}  # per class: its lowest keys, ascending (at most size)
        self._kept: list[tuple[float, int, tuple[torch.Tensor, ...]]] = []  # (key, class, rows)

    def _place(self, key: float, label: int) -> tuple[int, int]:
        # (round, seat): the round is the item's rank within its class
        return self._keys[label].index(key), self._class_order[label]

    def add(self, labels: torch.Tensor, *rows: torch.Tensor) -> None:
        """Offer a batch: its true ``labels`` ``(N,)`` and ``rows``, tensors of ``N`` rows each
        (what is kept of a chosen item, e.g. its image, probabilities, label)."""
        keys = torch.rand(len(labels), generator=self._generator, dtype=torch.float64)
        if self.size <= 0:
            return
        for i, (key, label) in enumerate(zip(keys.tolist(), labels.tolist())):
            lowest = self._keys.setdefault(label, [])
            if len(lowest) >= self.size and key >= lowest[-1]:
                continue  # size items of its class come before it: never in the sample
            lowest.append(key)
            lowest.sort()
            del lowest[self.size:]
            self._kept.append((key, label, i))  # its row number for now: copied below if it stays
            self._kept = [k for k in self._kept if k[0] in self._keys[k[1]]]
            self._kept.sort(key=lambda k: self._place(k[0], k[1]))
            del self._kept[self.size:]
        # copies, not views: the batch is freed
        self._kept = [(key, label, tuple(r[row].clone() for r in rows) if isinstance(row, int) else row)
                      for key, label, row in self._kept]

    def keys(self) -> list[float]:
        """The chosen items' keys, in the sample's order."""
        return [key for key, _, _ in self._kept]

    def rows(self) -> list[tuple[torch.Tensor, ...]]:
        """The chosen items' rows, in the sample's order (round-robin over the classes)."""
        return [rows for _, _, rows in self._kept]


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


# --------------------------------------------------------------------------- multi-label figures
def multilabel_grid(
    images: torch.Tensor,
    probs: torch.Tensor,
    targets: torch.Tensor | None,
    class_names: Sequence[str],
    thresholds: Sequence[float],
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
    num_cols: int = 4,
    scale: float = 2.2,
    title: str | None = None,
) -> Figure:
    """Images with the labels predicted over their thresholds (and probability); where the true
    label sets (``targets``, 0/1 ``(N, C)``) are known, each predicted label is marked right
    (``+``, green) or wrong (``-``, red) and the labels missed are listed (``missed: …``, red).
    The title of an image is green when its set is exactly right."""
    if len(images) == 0:
        fig = Figure(figsize=(num_cols * scale, scale), layout="constrained")
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "no images", ha="center", va="center", fontsize=12)
        return fig
    num_cols = min(num_cols, len(images))
    num_rows = -(-len(images) // num_cols)
    pixels = denormalize(images, mean, std).permute(0, 2, 3, 1).numpy()
    fig = Figure(figsize=(num_cols * scale, num_rows * (scale + 0.6)), layout="constrained")
    axes = fig.subplots(num_rows, num_cols, squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index >= len(images):
            continue
        ax.imshow(pixels[index])
        p = probs[index].float()
        chosen = [i for i in range(len(class_names)) if float(p[i]) >= float(thresholds[i])]
        chosen.sort(key=lambda i: -float(p[i]))
        truth = {i for i in range(len(class_names)) if targets is not None and float(targets[index][i]) > 0.5}
        marks = [f"{'+' if i in truth else '-'}{_short(class_names[i])} {float(p[i]):.0%}" if targets is not None
                 else f"{_short(class_names[i])} {float(p[i]):.0%}" for i in chosen]
        text = ", ".join(marks) or "no label"
        color = "black"
        if targets is not None:
            missed = sorted(truth - set(chosen))
            if missed:
                text += "\nmissed: " + ", ".join(_short(class_names[i]) for i in missed)
            color = CORRECT_COLOR if not missed and set(chosen) == truth else WRONG_COLOR
        ax.set_title(text, color=color, fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def label_counts_figure(true_positives: Sequence[int], false_positives: Sequence[int], false_negatives: Sequence[int],
                        class_names: Sequence[str], limit: int = MAX_HEATMAP_CLASSES) -> Figure:
    """Per label: images it was rightly given (true positives), wrongly given (false positives)
    and missed (false negatives), as horizontal bars — the multi-label view where a confusion
    matrix does not apply. Beyond ``limit`` labels, those with the most errors."""
    tp, fp, fn = (np.asarray(x, dtype=float) for x in (true_positives, false_positives, false_negatives))
    order = np.argsort(-(fp + fn), kind="stable")[:limit] if len(class_names) > limit else np.arange(len(class_names))
    order = order[::-1]  # barh draws bottom-up: the first label on top
    fig = Figure(figsize=(7, 1.6 + 0.35 * len(order)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(order))
    ax.barh(y - 0.27, tp[order], height=0.26, color=CORRECT_COLOR, label="right (true positives)")
    ax.barh(y, fp[order], height=0.26, color=WRONG_COLOR, label="wrongly given (false positives)")
    ax.barh(y + 0.27, fn[order], height=0.26, color="#9a6700", label="missed (false negatives)")
    ax.set_yticks(y, [_short(class_names[i]) for i in order])
    ax.set_xlabel("test images")
    fig.legend(loc="outside lower center", ncols=3, fontsize=8)
    ax.set_title("per-label counts at the decision threshold")
    return fig


def pr_curves_figure(probs: torch.Tensor, targets: torch.Tensor, class_names: Sequence[str],
                     limit: int = 12) -> Figure:
    """Precision-recall curve of each label (the ``limit`` most frequent), with its average
    precision (the area the mAP averages) in the legend."""
    from torchmetrics.functional.classification import binary_average_precision, binary_precision_recall_curve

    fig = Figure(figsize=(6, 5), layout="constrained")
    ax = fig.subplots()
    support = targets.float().sum(dim=0)
    for i in support.argsort(descending=True)[:limit].tolist():
        if float(support[i]) == 0:
            continue
        t = targets[:, i].long()
        precision, recall, _ = binary_precision_recall_curve(probs[:, i].float(), t)
        ap = float(binary_average_precision(probs[:, i].float(), t))
        ax.plot(recall.numpy(), precision.numpy(), label=f"{_short(class_names[i])} (AP {ap:.2f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title("precision-recall per label")
    ax.legend(fontsize=8, loc="lower left")
    return fig
