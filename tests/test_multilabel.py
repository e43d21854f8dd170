"""Several labels per image (``task=multilabel``): the task room, label files that hold label
sets, every regime, and train -> eval -> predict -> export on one trained model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, make_image_folder, make_multilabel_set, write_label_table
from hymtl.backbones import Preprocessing
from hymtl.data import ImageFolderDataModule
from hymtl.data.sources import TableSource
from hymtl.tasks import TaskError, make_task, tune_thresholds
from test_sources import REGIMES, fit_briefly
from test_train import TINY_MODEL, run_train

SMALL = Preprocessing(input_size=32, resize_size=36)
MULTILABEL = {"name": "multilabel", "threshold": 0.5}


# --------------------------------------------------------------------------- the task room
def test_the_task_decides_loss_metrics_and_labels():
    task = make_task({"name": "multilabel", "multilabel": True, "threshold": 0.4})
    assert task.monitor == "val/f1_micro" and isinstance(task.loss(None), torch.nn.BCEWithLogitsLoss)
    assert task.decode([0.9, 0.1, 0.45], ["a", "b", "c"]) == [("a", 0.9), ("c", 0.45)]
    assert task.decode([0.1, 0.2], ["a", "b"]) == []  # no label at all is an answer
    assert make_task(None).decode([0.2, 0.7, 0.1], ["a", "b", "c"], topk=2) == [("b", 0.7), ("a", 0.2)]
    weights = task.loss_weights([1, 3], "auto", images=4)
    assert weights.tolist() == [3.0, pytest.approx(1 / 3)]  # negatives / positives per label


@pytest.mark.parametrize("description, message", [
    ({"name": "multilabel", "threshold": 1.5}, "task.threshold must be a number between 0 and 1"),
    ({"name": "multilabel", "threshold": "abc"}, "task.threshold must be a number between 0 and 1"),
    ({"name": "multilabel", "treshold": 0.3}, "task.treshold is not a setting of task=multilabel"),
    ({"name": "multiclass", "metric": "f1_micro"}, "task.metric must be one of acc, acc_macro"),
    ({"name": "ranking"}, "unknown task 'ranking'"),
])
def test_bad_task_settings_are_one_line(description, message):
    with pytest.raises(TaskError, match=message):
        make_task(description)


def test_tuned_thresholds_maximise_each_labels_f1():
    probs = torch.tensor([[0.9, 0.2], [0.6, 0.3], [0.4, 0.8], [0.1, 0.35]])
    targets = torch.tensor([[1, 0], [1, 1], [0, 1], [0, 1]])
    cuts = tune_thresholds(probs, targets)
    assert cuts.tolist() == pytest.approx([0.6, 0.3])  # label 0 perfect at 0.6; label 1 all found at 0.3


# --------------------------------------------------------------------------- where the labels come from
def test_a_labels_column_with_separators_and_one_hot_columns_give_the_same_sets(tmp_path):
    table = make_multilabel_set(tmp_path / "set", count=12)
    separated = TableSource(file=str(table), multilabel=True).load()
    rows = [line.split(",") for line in table.read_text().splitlines()[1:]]
    names = ["blue", "green", "red"]
    onehot = write_label_table(tmp_path / "set" / "onehot.csv",
                               [(path, *(int(n in labels.split("|")) for n in names)) for path, labels in rows],
                               ("filename", *names))
    columns = TableSource(file=str(onehot), label_column=names, multilabel=True).load()
    assert separated.class_names == columns.class_names == names
    assert [s.label for s in separated.splits["train"]] == [s.label for s in columns.splits["train"]]
    assert any(s.label == () for s in separated.splits["train"])  # an image with no label: all negatives
    spaced = write_label_table(tmp_path / "set" / "spaced.csv", [(p, labels.replace("|", " ")) for p, labels in rows])
    assert [s.label for s in TableSource(file=str(spaced), multilabel=True).load().splits["train"]] == \
        [s.label for s in separated.splits["train"]]


def test_multilabel_targets_are_multi_hot(tmp_path):
    table = make_multilabel_set(tmp_path / "set", count=12)
    dm = ImageFolderDataModule(source="hymtl.data.sources.TableSource", file=str(table), multilabel=True,
                               preprocessing=SMALL, batch_size=12, num_workers=0, val_fraction=0.25)
    dm.setup("fit")
    _, targets = next(iter(dm.train_dataloader()))
    assert targets.dtype == torch.float32 and targets.shape[1] == 3
    assert set(targets.unique().tolist()) <= {0.0, 1.0}
    dataset = dm.train_dataloader().dataset
    for index, sample in enumerate(dm.train_samples):
        assert dataset[index][1].nonzero().flatten().tolist() == list(sample.label)


@pytest.mark.slow
def test_multilabel_with_class_folders_says_what_it_expected(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=2)
    result = run_train(*TINY_MODEL, "task=multilabel", "data=folder", f"data.root={root}", "+trainer.fast_dev_run=true",
                       cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: task=multilabel needs several labels per image, but class folders ({root}) give one label per image")


@pytest.mark.parametrize("overrides, message", [
    (["task.threshold=1.5"], "error: task.threshold must be a number between 0 and 1 (exclusive) or tune, got 1.5"),
    (["data.label_column=[red,'',blue]"], "error: data.label_column=['red', '', 'blue'] holds an empty name"),
])
@pytest.mark.slow
def test_bad_multilabel_settings_are_one_line_and_exit_2(tmp_path, overrides, message):
    table = make_multilabel_set(tmp_path / "set", count=8)
    result = run_train(*TINY_MODEL, "task=multilabel", "data=table", f"data.file={table}", *overrides,
                       "+trainer.fast_dev_run=true", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(message), last


# --------------------------------------------------------------------------- every regime
@pytest.mark.slow
@pytest.mark.parametrize("regime", list(REGIMES))
def test_multilabel_trains_in_each_regime(tmp_path, regime):
    table = make_multilabel_set(tmp_path / "set", count=16)
    dm = ImageFolderDataModule(source=TableSource(file=str(table), multilabel=True), multilabel=True,
                               preprocessing=SMALL, batch_size=4, num_workers=0, val_fraction=0.25)
    model, tested = fit_briefly(dm, regime, task={"name": "multilabel", "threshold": "tune"})
    assert {"test/f1_micro", "test/f1_macro", "test/map", "test/exact_match"} <= set(tested)
    assert model.thresholds.shape == (3,) and bool(((model.thresholds > 0) & (model.thresholds < 1)).all())


# --------------------------------------------------------------------------- one model, end to end
@pytest.fixture(scope="session")
def multilabel_run(tmp_path_factory) -> Path:
    """``hymtl.train task=multilabel`` on the procedural set (frozen ImageNet efficientnet_lite0)."""
    base = tmp_path_factory.mktemp("multilabel")
    table = make_multilabel_set(base / "set", count=80)
    run = base / "run"
    result = run_train("model=efficientnet_lite0", "mode=frozen", "mode.epochs=8", "task=multilabel",
                       "task.threshold=tune", "data=table", f"data.file={table}", "data.num_workers=0",
                       f"hydra.run.dir={run}", cwd=REPO_ROOT, timeout=900)
    if result.returncode != 0:
        pytest.fail(f"training the multi-label run failed:\n{result.stderr[-3000:]}")
    (run / "stdout.txt").write_text(result.stdout)
    return run


@pytest.mark.slow
def test_a_multilabel_run_reports_f1_and_map_and_draws_label_figures(multilabel_run):
    metrics = json.loads((multilabel_run / "metrics.json").read_text())
    for key in ("test/f1_micro", "test/f1_macro", "test/map", "test/exact_match", "val/f1_micro_best"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["task"] == {"name": "multilabel", "metric": "f1_micro", "threshold": "tune"}
    assert metrics["test/f1_micro"] >= 0.8, metrics  # coloured squares: an easy set (0.9+ measured)
    stdout = (multilabel_run / "stdout.txt").read_text()
    assert "test f1 micro" in stdout and "mAP" in stdout
    for figure in ("label_counts", "pr_curves", "predictions", "most_wrong"):
        assert (multilabel_run / "figures" / f"{figure}.png").is_file(), figure
    assert list((multilabel_run / "checkpoints").glob("best-epoch*-f1_micro*.ckpt"))


@pytest.mark.slow
def test_eval_and_predict_of_a_multilabel_model(multilabel_run, tmp_path):
    ckpt = sorted((multilabel_run / "checkpoints").glob("best-*.ckpt"))[0]
    evaluated = run_train(f"ckpt_path={ckpt}", "data=table", f"data.file={multilabel_run.parent / 'set' / 'labels.csv'}",
                          "data.num_workers=0", module="hymtl.eval", cwd=tmp_path, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "f1 micro" in evaluated.stdout and "threshold" in evaluated.stdout
    report = json.loads(sorted((multilabel_run / "eval").glob("*/eval.json"))[-1].read_text())
    assert report["task"] == "multilabel" and report["split"] == "all" and report["num_images"] == 80
    assert set(report["per_label"]) == {"blue", "green", "red"}

    images = sorted((multilabel_run.parent / "set" / "images").glob("*.png"))[:6]
    predicted = run_train(f"ckpt_path={ckpt}", f"inputs=[{','.join(map(str, images))}]", "format=json",
                          module="hymtl.predict", cwd=tmp_path, timeout=600)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    predictions = json.loads(predicted.stdout)["predictions"]
    thresholds = torch.load(ckpt, weights_only=True)["state_dict"]["decision_threshold"].tolist()
    names = ["blue", "green", "red"]
    for p in predictions:
        for item in p["top"]:  # every label over its threshold, none under
            assert item["probability"] >= thresholds[names.index(item["label"])] - 1e-6


@pytest.mark.slow
def test_a_multilabel_export_says_sigmoid_and_keeps_the_label_sets(multilabel_run, tmp_path):
    ckpt = sorted((multilabel_run / "checkpoints").glob("best-*.ckpt"))[0]
    out = tmp_path / "model.onnx"
    result = run_train(f"ckpt_path={ckpt}", f"out={out}",
                       f"parity.inputs=[{multilabel_run.parent / 'set' / 'images'}]", "parity.max_images=24",
                       module="hymtl.export", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "label sets agree 24/24" in result.stdout + result.stderr
    meta = json.loads(out.with_name(out.name + ".json").read_text())
    assert meta["output_activation"] == "sigmoid" and meta["task"]["name"] == "multilabel"
    assert meta["version"] == 2 and len(meta["thresholds"]) == 3  # readers of version 1 refuse it


# --------------------------------------------------------------------------- real photos
def _side_by_side(sources: list[Path], out: Path, prefix: str, count: int, seed: int) -> list[tuple[str, str]]:
    """``count`` images made of two photos side by side; the labels are the classes shown."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        left, right = rng.choice(sources), rng.choice(sources)
        with Image.open(left) as a, Image.open(right) as b:
            a, b = a.convert("RGB").resize((160, 160)), b.convert("RGB").resize((160, 160))
            canvas = Image.new("RGB", (320, 160))
            canvas.paste(a, (0, 0))
            canvas.paste(b, (160, 0))
            path = out / f"{prefix}{i:04d}.jpg"
            canvas.save(path, quality=90)
        rows.append((path.name, "|".join(sorted({left.parent.name, right.parent.name}))))
    return rows


@pytest.mark.realdata
@pytest.mark.slow
def test_ants_and_bees_side_by_side_as_multilabel(real_data, tmp_path):
    """Two ants/bees photos side by side, labelled with the set of classes shown ({ants},
    {bees}, {ants, bees}): frozen ImageNet efficientnet_lite0 learns the sets."""
    images = tmp_path / "pairs"
    images.mkdir()
    train = _side_by_side(sorted(real_data.glob("train/*/*.jpg")), images, "t", 240, seed=0)
    val = _side_by_side(sorted(real_data.glob("val/*/*.jpg")), images, "v", 120, seed=1)
    rows = [(name, labels, "train") for name, labels in train] + [(name, labels, "val") for name, labels in val]
    table = write_label_table(images / "labels.csv", rows, ("filename", "labels", "split"))
    result = run_train("model=efficientnet_lite0", "mode=frozen", "task=multilabel", "data=table", f"data.file={table}",
                       "hydra.run.dir=run", cwd=tmp_path, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["test/f1_micro"] >= 0.85, metrics
