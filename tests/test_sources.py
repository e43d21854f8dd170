"""Data in the shapes people bring: label files (CSV, TSV, JSON lines) and Parquet through the
one data-source seam, in every regime; k-fold; the balanced sampler and class weights; every
problem with a label or Parquet file as one line naming the file, the row and the column."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from conftest import folder_as_parquet, folder_as_table, make_image, make_image_folder, write_label_table
from hymtl.backbones import Preprocessing
from hymtl.data import ImageFolderDataModule
from hymtl.data.sources import FolderSource, ParquetSource, TableSource
from hymtl.errors import DataError
from hymtl.features import FeatureServer
from hymtl.model import TransferModule
from test_train import TINY_MODEL, run_train

SMALL = Preprocessing(input_size=32, resize_size=36)

#: regime -> (unfreeze_at_epoch, trainable_stages, features served, epochs)
REGIMES = {
    "frozen": (None, None, True, 1),
    "partial": (0, 1, True, 1),
    "finetune": (0, None, False, 1),
    "two_phase": (1, None, True, 2),
}


def datamodule_of(kind: str, root: Path, tmp_path: Path, **kwargs) -> ImageFolderDataModule:
    """The class folders ``root`` given as ``kind``: folder, table (CSV) or parquet."""
    if kind == "folder":
        source = FolderSource(root=str(root))
    elif kind == "table":
        source = TableSource(file=str(folder_as_table(root, tmp_path / "labels.csv")))
    else:
        source = ParquetSource(files=str(folder_as_parquet(root, tmp_path / "parquet")))
    return ImageFolderDataModule(source=source, batch_size=4, num_workers=0, preprocessing=SMALL, **kwargs)


def fit_briefly(datamodule: ImageFolderDataModule, regime: str, task: dict | None = None, tmp_path: Path | None = None):
    """One short fit and test of ``regime`` (a batch or two per epoch), as hymtl.train wires it."""
    unfreeze, stages, features, epochs = REGIMES[regime]
    server = FeatureServer(precompute=features, views=1, enabled=False)
    datamodule.features = server
    model = TransferModule(backbone="efficientnet_lite0", pretrained=False, num_classes=len(datamodule.class_names),
                           class_names=datamodule.class_names, unfreeze_at_epoch=unfreeze, trainable_stages=stages,
                           task=task, class_counts=datamodule.class_counts,
                           train_images=len(datamodule.train_samples))
    datamodule.preprocessing = model.preprocessing
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, limit_train_batches=2, limit_val_batches=2,
                         limit_test_batches=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, precision="32-true",
                         **server.trainer_kwargs(model))
    trainer.fit(model, datamodule=datamodule)
    return model, trainer.test(model, datamodule=datamodule, verbose=False)[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["table", "parquet"])
@pytest.mark.parametrize("regime", list(REGIMES))
def test_each_source_trains_in_each_regime(tmp_path, kind, regime):
    root = make_image_folder(tmp_path / "images", per_class=4)
    datamodule = datamodule_of(kind, root, tmp_path)
    assert datamodule.class_names == ["ants", "bees"]
    _, tested = fit_briefly(datamodule, regime)
    assert 0.0 <= tested["test/acc"] <= 1.0


@pytest.mark.parametrize("kind", ["folder", "table", "parquet"])
def test_every_source_gives_the_same_samples_splits_and_class_names(tmp_path, kind):
    root = make_image_folder(tmp_path / "images", splits=("train", "val", "test"), per_class=3)
    datamodule = datamodule_of(kind, root, tmp_path)
    datamodule.setup("fit")
    assert datamodule.class_names == ["ants", "bees"] and datamodule.test_split_name == "test"
    assert [len(s) for s in (datamodule.train_samples, datamodule.val_samples, datamodule.test_samples)] == [6, 6, 6]
    assert [s.label for s in datamodule.train_samples] == [0, 0, 0, 1, 1, 1]
    if kind == "parquet":  # the bytes are held, the origin names the file and the row
        assert all(s.data and "#row=" in s.path for s in datamodule.train_samples)


def test_tsv_and_json_lines_read_as_csv_does(tmp_path):
    root = make_image_folder(tmp_path / "images", splits=("train",), per_class=3)
    rows = [(os.path.relpath(p, tmp_path), p.parent.name) for p in sorted(root.glob("*/*/*"))]
    samples = []
    for suffix in (".csv", ".tsv", ".jsonl"):
        source = TableSource(file=str(write_label_table(tmp_path / f"labels{suffix}", rows)))
        data = source.load()
        samples.append([(s.path, s.label) for s in data.splits["train"]])
        assert data.class_names == ["ants", "bees"]
    assert samples[0] == samples[1] == samples[2] and len(samples[0]) == 6


def test_parquet_struct_cells_and_string_labels(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = make_image_folder(tmp_path / "images", splits=("train",), per_class=3)
    images = sorted(root.glob("*/*/*"))
    table = pa.table({"img": [{"bytes": p.read_bytes(), "path": p.name} for p in images],
                      "class": [p.parent.name for p in images]})
    pq.write_table(table, tmp_path / "data.parquet")
    data = ParquetSource(files=str(tmp_path / "data.parquet")).load()
    assert data.class_names == ["ants", "bees"] and len(data.splits["train"]) == 6
    assert data.splits["train"][0].data == images[0].read_bytes()


def test_a_missing_image_is_skipped_with_its_reason_and_an_eval_only_label_is_warned(tmp_path, caplog):
    root = make_image_folder(tmp_path / "images", splits=("train",), per_class=3)
    rows = [(os.path.relpath(p, tmp_path), p.parent.name, "train") for p in sorted(root.glob("*/*/*"))]
    make_image(tmp_path / "images" / "extra" / "w.jpg", (220, 200, 30))
    rows += [("images/train/ants/gone.jpg", "ants", "train"), ("images/extra/w.jpg", "wasps", "val")]
    make_image(tmp_path / "images" / "extra" / "b.jpg", (40, 40, 200))
    rows += [("images/extra/b.jpg", "bees", "val")]
    table = write_label_table(tmp_path / "labels.csv", rows, ("filename", "label", "split"))
    skipped = tmp_path / "skipped.txt"
    dm = ImageFolderDataModule(source="hymtl.data.sources.TableSource", file=str(table), preprocessing=SMALL,
                               batch_size=2, num_workers=0, skipped_file=str(skipped))
    with caplog.at_level("WARNING", logger="hymtl"):
        dm.setup("fit")
    assert "gone.jpg" in skipped.read_text()
    assert dm.split_report["unknown_val_classes"] == {"count": 1, "images": 1, "examples": ["wasps"]}
    assert any("1 label unknown to train left out (1 images): wasps" in r.getMessage() for r in caplog.records)


BAD_TABLES = {
    "missing column": ("filename,kind\na.jpg,ants\n", "no column of labels (looked for label"),
    "empty label": ("filename,label\nimages/a.jpg,\n", "row 2, column 'label': empty label"),
    "path leaving the root": ("filename,label\n../secret.jpg,ants\n", "row 2, column 'filename': the path '../secret.jpg' leaves"),
    "absolute path outside": ("filename,label\n/etc/passwd,ants\n", "row 2, column 'filename': the path '/etc/passwd' leaves"),
    "conflicting duplicate": ("filename,label\na.jpg,ants\nb.jpg,bees\na.jpg,bees\n", "row 4, column 'filename': a.jpg is listed again"),
    "header only": ("filename,label\n", "has a header but no rows"),
    "empty file": ("", "is empty: expected a header row"),
    "bad split": ("filename,label,split\na.jpg,ants,holdout\n", "row 2, column 'split': unknown split 'holdout'"),
    "ragged row": ("filename,label\na.jpg,ants,extra\n", "row 2: 3 cells for 2 columns"),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_a_bad_label_file_is_one_error_naming_the_file_row_and_column(tmp_path, case):
    text, message = BAD_TABLES[case]
    table = tmp_path / "labels.csv"
    table.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        TableSource(file=str(table)).load()
    line = str(caught.value)
    assert "\n" not in line and str(table) in line and message in line, line


def test_text_that_is_not_utf8_names_its_row(tmp_path):
    table = tmp_path / "labels.csv"
    table.write_bytes(b"filename,label\na.jpg,ants\nb.jpg,b\xe9es\n")
    with pytest.raises(DataError, match=r"labels.csv, row 3: text that is not UTF-8 \(byte 0xe9\)"):
        TableSource(file=str(table)).load()


def test_a_parquet_image_cell_that_is_not_bytes_is_one_error(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"image": ["not bytes"], "label": ["ants"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"x.parquet, row 0, column 'image': expected the image's bytes or a struct "
                                        r"with bytes, got str"):
        ParquetSource(files=str(tmp_path / "x.parquet")).load()


@pytest.mark.slow
def test_bad_label_file_from_the_command_line_is_one_line_and_exit_2(tmp_path):
    table = tmp_path / "labels.csv"
    table.write_text("filename,label\n../outside.jpg,ants\n", encoding="utf-8")
    result = run_train(*TINY_MODEL, "data=table", f"data.file={table}", "+trainer.fast_dev_run=true", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {table}, row 2, column 'filename': the path '../outside.jpg' leaves the image root {tmp_path} "
        "(set data.image_root to a folder that holds it)")


def test_an_unknown_data_key_names_the_nearest_setting(tmp_path):
    with pytest.raises(DataError, match=r"data.label_colum is not a setting of data=table; did you mean "
                                        r"data.label_column"):
        ImageFolderDataModule(source="hymtl.data.sources.TableSource", file="x.csv", label_colum="y")


# --------------------------------------------------------------------------- k-fold
def test_kfold_folds_partition_the_pool_and_keep_the_test_split_out(tmp_path):
    root = make_image_folder(tmp_path / "images", splits=("train", "val", "test"), per_class=5)
    vals, test_paths = [], None
    for fold in range(5):
        dm = ImageFolderDataModule(root=str(root), preprocessing=SMALL, num_workers=0, folds=5, fold=fold, seed=3)
        dm.setup("fit")
        train, val = {s.path for s in dm.train_samples}, {s.path for s in dm.val_samples}
        assert not train & val and len(train | val) == 20  # train + val images pooled
        assert sorted(s.label for s in dm.val_samples) == [0, 0, 1, 1]  # stratified
        test = {s.path for s in dm.test_samples}
        assert not test & (train | val) and (test_paths is None or test == test_paths)
        test_paths = test
        vals.append(val)
    assert len(set().union(*vals)) == sum(len(v) for v in vals) == 20  # each image in exactly one fold's val


@pytest.mark.parametrize("folds, fold, message", [(1.5, 0, "data.folds must be an integer >= 2"),
                                                  (5, 5, "data.fold must be an integer from 0 to 4")])
def test_bad_fold_settings_are_one_line(tmp_path, folds, fold, message):
    root = make_image_folder(tmp_path / "images", splits=("train",), per_class=5)
    dm = ImageFolderDataModule(root=str(root), preprocessing=SMALL, num_workers=0, folds=folds, fold=fold)
    with pytest.raises(DataError, match=message):
        dm.setup("fit")


@pytest.mark.slow
def test_a_kfold_sweep_shares_one_feature_cache_and_summarize_prints_mean_and_std(tmp_path):
    root = make_image_folder(tmp_path / "images", splits=("train",), per_class=6)
    cache = tmp_path / "cache"
    result = run_train("-m", *TINY_MODEL, "mode=frozen", "mode.epochs=1", "data=folder", f"data.root={root}",
                       "data.folds=3", "data.fold=0,1,2", "mode.feature_views=0", "hydra.sweep.dir=sweep",
                       env={"HYMTL_CACHE_DIR": str(cache)}, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    from conftest import cached_rows

    assert cached_rows(cache) == 12  # every image extracted once, not once per fold
    summary = (tmp_path / "sweep" / "summary.md").read_text()
    assert "±" in summary and "3 runs" in summary, summary


# --------------------------------------------------------------------------- imbalance
def _imbalanced(tmp_path: Path) -> Path:
    root = tmp_path / "imbalanced"
    for i in range(20):
        make_image(root / "common" / f"{i}.jpg", (200, 40, 40), seed=i)
    for i in range(2):
        make_image(root / "rare" / f"{i}.jpg", (40, 40, 200), seed=100 + i)
    return root


def test_the_balanced_sampler_draws_each_class_equally_often(tmp_path):
    dm = ImageFolderDataModule(root=str(_imbalanced(tmp_path)), preprocessing=SMALL, num_workers=0, batch_size=4,
                               sampler="balanced", val_fraction=0.1)
    dm.setup("fit")
    counts = dm.class_counts
    assert counts[0] / counts[1] > 5
    sampler = dm._train_sampler(dm.train_samples)
    torch.manual_seed(0)
    drawn = [dm.train_samples[i].labels[0] for _ in range(50) for i in sampler]
    share = sum(drawn) / len(drawn)
    assert 0.4 < share < 0.6, share  # about half rare, though it is 1 image in 10


def test_imbalance_is_reported_with_both_remedies(tmp_path, caplog):
    dm = ImageFolderDataModule(root=str(_imbalanced(tmp_path)), preprocessing=SMALL, num_workers=0, val_fraction=0.1)
    with caplog.at_level("WARNING", logger="hymtl"):
        dm.setup("fit")
    assert dm.split_report["train_imbalance"]["ratio"] == 18.0
    text = " ".join(r.getMessage() for r in caplog.records)
    assert "unbalanced 1:18.0" in text and "data.sampler=balanced" in text and "model.class_weights=auto" in text


def test_class_weights_auto_weigh_the_loss_by_inverse_frequency():
    model = TransferModule(backbone="efficientnet_lite0", pretrained=False, num_classes=2, class_weights="auto",
                           class_counts=[18, 2], unfreeze_at_epoch=None)
    assert model.criterion.weight.tolist() == pytest.approx([20 / (2 * 18), 20 / (2 * 2)])
    with pytest.raises(Exception, match="one positive number per class"):
        TransferModule(backbone="efficientnet_lite0", pretrained=False, num_classes=2, class_weights=[1.0],
                       class_counts=[18, 2], unfreeze_at_epoch=None)


# --------------------------------------------------------------------------- real data
@pytest.mark.realdata
@pytest.mark.slow
def test_ants_and_bees_as_a_table_and_as_parquet_score_as_the_folder_does(real_data, tmp_path):
    """The same images through three sources, the same seed: the same test accuracy."""
    rows = []
    for split in ("train", "val"):
        for image in sorted((real_data / split).glob("*/*")):
            rows.append((f"{split}/{image.parent.name}/{image.name}", image.parent.name, split))
    table = write_label_table(tmp_path / "labels.csv", rows, ("filename", "label", "split"))
    parquet = folder_as_parquet(real_data, tmp_path / "parquet")
    common = ["mode=frozen", "model=efficientnet_lite0", "mode.epochs=3", "mode.feature_views=0", "data.num_workers=0",
              "trainer.precision=32-true", "trainer.accelerator=cpu"]
    sources = {"folder": ["data=folder", f"data.root={real_data}"],
               "table": ["data=table", f"data.file={table}", f"data.image_root={real_data}"],
               "parquet": ["data=parquet", f"data.files={parquet}"]}
    accuracy = {}
    for name, overrides in sources.items():
        result = run_train(*common, *overrides, f"hydra.run.dir={name}", cwd=tmp_path, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        accuracy[name] = json.loads((tmp_path / name / "metrics.json").read_text())["test/acc"]
    assert accuracy["folder"] >= 0.9, accuracy
    assert accuracy["table"] == accuracy["folder"] == accuracy["parquet"], accuracy


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["table", "parquet"])
def test_export_takes_its_parity_images_from_the_runs_source(tmp_path, kind):
    """No parity.inputs: the val images of the source the run was trained on (files or bytes)."""
    root = make_image_folder(tmp_path / "images", per_class=4)
    data = (["data=table", f"data.file={folder_as_table(root, tmp_path / 'labels.csv')}"] if kind == "table"
            else ["data=parquet", f"data.files={folder_as_parquet(root, tmp_path / 'parquet')}"])
    trained = run_train(*TINY_MODEL, "mode=frozen", "mode.epochs=1", *data, "hydra.run.dir=run", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = next((tmp_path / "run" / "checkpoints").glob("best-*.ckpt"))
    exported = run_train(f"ckpt_path={ckpt}", f"out={tmp_path / 'model.onnx'}", module="hymtl.export", cwd=tmp_path,
                         timeout=900)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert "top-1 agree 8/8" in exported.stdout + exported.stderr
