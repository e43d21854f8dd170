"""Test-time figures and tables stay bounded for many classes (1000), and the prediction grid is
a seeded sample spread over the true classes, mistakes included: built from synthetic logits and
labels through the callbacks' own hooks (no training, no Trainer)."""

from __future__ import annotations

import io
import resource
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from hymtl.callbacks import ClassificationReport, TestFigures
from hymtl.features import FeatureBatch
from hymtl.figures import (
    MAX_HEATMAP_CLASSES,
    ClassSpreadSample,
    confused_pairs,
    confused_pairs_figure,
    confusion_matrix_figure,
    most_confused_classes,
)

MAX_SIDE_PX = 4000  # what a test figure may measure per side, whatever the class count


class _Module(torch.nn.Module):
    """Stands in for the LightningModule: class names, a device, and a forward that returns the
    logits the test sets (the callbacks see them through their forward hook, as in test_step)."""

    def __init__(self, class_names):
        super().__init__()
        self.class_names = list(class_names)
        self.device = torch.device("cpu")
        self.hparams = SimpleNamespace(num_classes=len(class_names))
        self.logits = None

    def forward(self, x):
        return self.logits


def _trainer(datamodule=None):
    return SimpleNamespace(is_global_zero=True, loggers=[], datamodule=datamodule, global_step=0)


def _run_test(callbacks, module, batches, datamodule=None):
    """The callbacks' hooks in trainer.test's order, over ``batches`` of (batch, logits)."""
    trainer = _trainer(datamodule)
    for callback in callbacks:
        callback.on_test_start(trainer, module)
    for index, (batch, logits) in enumerate(batches):
        module.logits = logits
        module(batch[0])  # the forward hook records the logits, as test_step's self(images) does
        for callback in callbacks:
            callback.on_test_batch_end(trainer, module, None, batch, index)
    for callback in callbacks:
        callback.on_test_epoch_end(trainer, module)
        callback.on_test_end(trainer, module)


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def _max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _synthetic(num_classes: int, per_class: int, image_size: int = 16, seed: int = 0, error_rate: float = 0.2):
    """Labels sorted by class (as an image folder lists them) and logits right except for
    ``error_rate`` of the images, whose mistakes concentrate on a few neighbouring classes."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    predicted = labels.clone()
    wrong = torch.rand(len(labels), generator=generator) < error_rate
    predicted[wrong] = (labels[wrong] + 1 + (torch.rand(int(wrong.sum()), generator=generator) < 0.3).long()) % num_classes
    logits = torch.randn(len(labels), num_classes, generator=generator)
    logits[torch.arange(len(labels)), predicted] += 8.0
    images = torch.randn(len(labels), 3, image_size, image_size, generator=generator) * 0.5
    return images, logits, labels


def _image_batches(images, logits, labels, batch_size):
    for start in range(0, len(labels), batch_size):
        part = slice(start, start + batch_size)
        yield (images[part], labels[part]), logits[part]


# --------------------------------------------------------------------------- many classes
def test_figures_and_report_stay_bounded_for_1000_classes(tmp_path):
    num_classes, per_class = 1000, 5
    names = [f"class_{i:04d}_with_a_rather_long_descriptive_name" for i in range(num_classes)]
    images, logits, labels = _synthetic(num_classes, per_class, image_size=32)
    module = _Module(names)
    figures = TestFigures(num_images=8, num_wrong=8, save_dir=str(tmp_path / "figures"))
    report = ClassificationReport()

    before = _max_rss_bytes()
    _run_test([figures, report], module, _image_batches(images, logits, labels, batch_size=250))
    grown = _max_rss_bytes() - before

    # every picture bounded (the old heat map was ~111 px per class and side: 111,000 px here)
    sizes = {p.stem: _png_size(p) for p in sorted((tmp_path / "figures").iterdir())}
    assert set(sizes) == {"confusion_matrix", "predictions", "most_wrong"}
    for name, (width, height) in sizes.items():
        assert 300 <= width <= MAX_SIDE_PX and 200 <= height <= MAX_SIDE_PX, (name, width, height)
    # the peak memory of the process (a high-water mark: it can only under-count, never flake
    # upwards) grew by far less than the 12 GB a 150-class heat map took
    assert grown < 1.5 * 2**30, f"peak RSS grew by {grown / 2**20:.0f} MiB"

    # the whole matrix is in the report (for the JSON), with the most frequent mistakes
    result = report.report
    assert len(result["confusion_matrix"]) == num_classes and sum(map(sum, result["confusion_matrix"])) == len(labels)
    assert len(result["per_class"]) == num_classes
    pairs = result["confused_pairs"]
    assert len(pairs) == 20 and [p["count"] for p in pairs] == sorted((p["count"] for p in pairs), reverse=True)
    matrix = torch.tensor(result["confusion_matrix"])
    off = matrix - torch.diag(torch.diag(matrix))
    assert pairs[0]["count"] == int(off.max())
    for pair in pairs:
        i, j = names.index(pair["true"]), names.index(pair["predicted"])
        assert i != j and matrix[i, j] == pair["count"]
        assert pair["share"] == pytest.approx(pair["count"] / per_class)


def test_the_heat_map_is_complete_up_to_the_cap_and_the_most_confused_classes_beyond():
    full = confusion_matrix_figure(torch.eye(MAX_HEATMAP_CLASSES, dtype=torch.long) * 3, [str(i) for i in range(MAX_HEATMAP_CLASSES)])
    (heat,) = [ax for ax in full.axes if ax.get_images() and ax.get_ylabel() == "true"]
    assert heat.get_images()[0].get_array().shape == (MAX_HEATMAP_CLASSES, MAX_HEATMAP_CLASSES)
    assert full.get_size_inches().max() * 100 <= MAX_SIDE_PX

    n = 300
    matrix = torch.diag(torch.full((n,), 10))
    matrix[7, 250] = 6  # the mistakes: classes 7, 250, 3, 4 and 120 must be on the map
    matrix[3, 4] = 2
    matrix[120, 3] = 1
    matrix[7, 7] -= 6
    names = [f"c{i}" for i in range(n)]
    shown = most_confused_classes(matrix, MAX_HEATMAP_CLASSES)
    assert len(shown) == MAX_HEATMAP_CLASSES and shown == sorted(shown)
    assert {3, 4, 7, 120, 250} <= set(shown)
    fig = confusion_matrix_figure(matrix, names)
    (heat,) = [ax for ax in fig.axes if ax.get_images() and ax.get_ylabel() == "true"]
    assert heat.get_images()[0].get_array().shape == (MAX_HEATMAP_CLASSES, MAX_HEATMAP_CLASSES)
    assert f"the {MAX_HEATMAP_CLASSES} most confused of {n} classes" in heat.get_title()
    assert [t.get_text() for t in heat.get_yticklabels()] == [names[i] for i in shown]
    assert not heat.texts  # no per-cell text at this size
    (bars,) = [ax for ax in fig.axes if ax.patches]
    assert [t.get_text() for t in bars.get_yticklabels()] == ["c7 → c250", "c3 → c4", "c120 → c3"]
    width, height = fig.get_size_inches() * 100
    assert width <= MAX_SIDE_PX and height <= MAX_SIDE_PX


def test_a_small_heat_map_keeps_its_counts_and_shares_per_cell():
    fig = confusion_matrix_figure([[8, 2], [1, 9]], ["ants", "bees"])
    (heat,) = fig.axes[:1]
    assert [t.get_text() for t in heat.texts] == ["8\n80%", "2\n20%", "1\n10%", "9\n90%"]
    assert len(fig.axes) == 2  # the map and its colour bar: no pairs panel below the cap


def test_confused_pairs_most_frequent_first_ties_by_index_and_only_real_mistakes():
    matrix = [[5, 2, 0], [2, 4, 3], [0, 0, 7]]
    pairs = confused_pairs(matrix, ["a", "b", "c"], top=10)
    assert pairs == [
        {"true": "b", "predicted": "c", "count": 3, "share": pytest.approx(3 / 9)},
        {"true": "a", "predicted": "b", "count": 2, "share": pytest.approx(2 / 7)},
        {"true": "b", "predicted": "a", "count": 2, "share": pytest.approx(2 / 9)},
    ]
    assert confused_pairs(matrix, ["a", "b", "c"], top=1) == pairs[:1]
    assert confused_pairs(torch.eye(3, dtype=torch.long), ["a", "b", "c"]) == []
    figure = confused_pairs_figure(pairs)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    assert Image.open(buffer).size[0] <= MAX_SIDE_PX


# --------------------------------------------------------------------------- the prediction grid
def _reference_round_robin(keys, labels, class_order, size):
    """The sample by its definition, over the whole stream at once."""
    ranked = {}
    for position in sorted(range(len(keys)), key=lambda i: keys[i]):
        ranked.setdefault(labels[position], []).append(position)
    places = {p: (rank, class_order[c]) for c, members in ranked.items() for rank, p in enumerate(members)}
    return sorted(places, key=places.get)[:size]


@pytest.mark.parametrize("num_classes,counts", [(2, [60, 40]), (5, [1, 30, 0, 2, 9]), (50, [3] * 50)])
def test_class_spread_sample_streams_exactly_the_round_robin_sample(num_classes, counts):
    labels = torch.cat([torch.full((count,), c) for c, count in enumerate(counts)])
    positions = torch.arange(len(labels))
    for batch_size in (1, 7, len(labels)):
        sample = ClassSpreadSample(8, num_classes, seed=3)
        for start in range(0, len(labels), batch_size):
            sample.add(labels[start:start + batch_size], positions[start:start + batch_size])
        generator = torch.Generator().manual_seed(3)
        order = torch.randperm(num_classes, generator=generator).tolist()
        keys = torch.rand(len(labels), generator=generator, dtype=torch.float64).tolist()
        expected = _reference_round_robin(keys, labels.tolist(), order, 8)
        assert [int(row[0]) for row in sample.rows()] == expected, batch_size
    # round-robin: as many classes as the grid has room for
    present = [c for c in range(num_classes) if counts[c]]
    assert len(set(labels[expected].tolist())) == min(8, len(present))


def _grid_titles(monkeypatch, folder, images, logits, labels, names, seed, batch_size=16):
    """The prediction grid's titles, through TestFigures' hooks (its figure is spied on)."""
    import hymtl.callbacks

    drawn = []
    grid = hymtl.callbacks.prediction_grid

    def spy(*args, **kwargs):
        figure = grid(*args, **kwargs)
        drawn.append([ax.get_title() for ax in figure.axes if ax.get_title()])
        return figure

    monkeypatch.setattr(hymtl.callbacks, "prediction_grid", spy)
    figures = TestFigures(num_images=8, num_wrong=4, save_dir=str(folder), seed=seed)
    _run_test([figures], _Module(names), _image_batches(images, logits, labels, batch_size))
    (titles,) = drawn
    return titles


def test_the_prediction_grid_spreads_over_the_classes_with_mistakes_and_is_seeded(tmp_path, monkeypatch):
    # ants/bees as an image folder lists them: every ant first; two mistakes among 120 images
    names = ["ants", "bees"]
    images, logits, labels = _synthetic(2, 60, error_rate=0.0)
    logits[[5, 90]] = logits[[5, 90]].flip(-1)  # one ant taken for a bee, one bee for an ant
    titles = _grid_titles(monkeypatch, tmp_path / "a", images, logits, labels, names, seed=0)
    assert len(titles) == 8
    true = [t.split("true: ")[1] for t in titles]
    assert true.count("ants") == 4 and true.count("bees") == 4  # the first eight are all ants
    wrong = [t for t in titles if t.split(" (")[0] != t.split("true: ")[1]]
    assert len(wrong) == 2  # a quarter of the grid: both mistakes
    assert _png_size(tmp_path / "a" / "predictions.png")[0] >= 300

    assert _grid_titles(monkeypatch, tmp_path / "b", images, logits, labels, names, seed=0) == titles  # deterministic
    assert _grid_titles(monkeypatch, tmp_path / "c", images, logits, labels, names, seed=0, batch_size=7) == titles
    others = {tuple(_grid_titles(monkeypatch, tmp_path / f"s{s}", images, logits, labels, names, seed=s)) for s in (1, 2, 3)}
    assert others - {tuple(titles)}  # another seed, another sample (confidences differ per image)

    # without mistakes the grid is all right; with many it keeps its own sample
    clean = _grid_titles(monkeypatch, tmp_path / "d", *_synthetic(2, 60, error_rate=0.0), names, seed=0)
    assert all(t.split(" (")[0] == t.split("true: ")[1] for t in clean)
    noisy = _grid_titles(monkeypatch, tmp_path / "e", *_synthetic(2, 60, error_rate=0.5), names, seed=0)
    assert sum(t.split(" (")[0] != t.split("true: ")[1] for t in noisy) >= 2


def test_the_grid_of_feature_batches_decodes_only_the_sampled_test_images(tmp_path):
    names = [f"class{i}" for i in range(6)]
    images, logits, labels = _synthetic(6, 10, image_size=8, error_rate=0.3)
    decoded = []

    class _DataModule:  # hymtl.features.ServesFeatures: what TestFigures asks a datamodule
        def serves_features(self, stage):
            return stage == "test"

        def test_images(self, positions):
            decoded.append(list(positions))
            return images[list(positions)]

    batches = []
    for start in range(0, len(labels), 16):
        part = slice(start, start + 16)
        features = torch.randn(len(labels[part]), 5)
        batches.append((FeatureBatch(features, torch.arange(len(labels))[part], labels[part]), logits[part]))
    figures = TestFigures(num_images=8, num_wrong=4, save_dir=str(tmp_path))
    _run_test([figures], _Module(names), batches, datamodule=_DataModule())
    grid, wrong = decoded  # two decodes: the grid's 8 and the most-wrong 4, nothing else
    assert len(grid) == 8 and len(set(labels[grid].tolist())) == 6 and len(wrong) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["confusion_matrix.png", "most_wrong.png", "predictions.png"]


# --------------------------------------------------------------------------- the report's scores
def test_the_reports_scores_from_one_confusion_matrix_are_torchmetrics_scores():
    from torchmetrics.classification import (
        MulticlassAccuracy,
        MulticlassConfusionMatrix,
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

    from hymtl.callbacks import ConfusionCounts, scores_of

    n = 7  # class 5 never occurs, class 6 neither occurs nor is predicted
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (300,), generator=generator)
    logits = torch.randn(300, n, generator=generator)
    logits[:40, 5] += 10.0  # predicted, never true
    logits[:, 6] -= 10.0
    counts = ConfusionCounts(n)
    for part in range(0, 300, 64):
        counts.update(logits[part:part + 64], labels[part:part + 64])
    matrix = counts.compute()
    assert torch.equal(matrix, MulticlassConfusionMatrix(n)(logits, labels))
    scores = scores_of(matrix)
    assert scores["accuracy"] == pytest.approx(float(MulticlassAccuracy(n, average="micro")(logits, labels)), abs=1e-6)
    for name, metric in (("precision", MulticlassPrecision), ("recall", MulticlassRecall), ("f1", MulticlassF1Score)):
        expected = metric(n, average=None)(logits, labels)
        assert scores["per_class"][name].tolist() == pytest.approx(expected.tolist(), abs=1e-6), name
        assert scores["macro"][name] == pytest.approx(float(metric(n, average="macro")(logits, labels)), abs=1e-6), name


def test_the_printed_eval_report_stays_bounded_at_1000_classes():
    """One line per class, no 1000x1000 table on the console: the most confused pairs instead."""
    from hymtl.evaluation import format_report

    names = [f"class_{i}" for i in range(1000)]
    result = {
        "class_names": names, "checkpoint": "ckpt", "data_root": "root", "split": "val", "num_images": 1000,
        "per_class": {n: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1} for n in names},
        "macro": {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1000}, "accuracy": 1.0, "loss": 0.1,
        "confusion_matrix": [[0] * 1000 for _ in range(1000)],
        "confused_pairs": [{"true": "class_1", "predicted": "class_2", "count": 3, "share": 0.5}],
    }
    lines = format_report(result).splitlines()
    assert len(lines) < 1020 and max(len(line) for line in lines) < 200
    assert lines[-1].strip() == "class_1 -> class_2  3"
