"""Splits that do not match are reported, never silent: evaluation classes unknown to train,
train classes absent from an evaluation split, files duplicated across train and val/test.
Each is one warning line and an entry of ``ImageFolderDataModule.split_report`` (JSON-ready)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import make_image
from hymtl.backbones import Preprocessing
from hymtl.data import ImageFolderDataModule
from hymtl.data import folders, splits

SMALL = Preprocessing(input_size=32, resize_size=36)
COLORS = {"ants": (200, 40, 40), "bees": (40, 40, 200), "wasps": (40, 200, 40)}


def make_split(root: Path, split: str, classes: dict[str, int], offset: int) -> None:
    """``root/split/<class>/<i>.jpg``: ``classes[name]`` distinct images (seeds from ``offset``)."""
    for c, (name, count) in enumerate(classes.items()):
        for i in range(count):
            make_image(root / split / name / f"{name}_{i}.jpg", COLORS[name], seed=offset + 100 * c + i)


def _report(root: Path, caplog) -> tuple[dict, list[str]]:
    dm = ImageFolderDataModule(root=str(root), preprocessing=SMALL, batch_size=4, num_workers=0)
    with caplog.at_level("WARNING", logger="hymtl"):
        dm.setup("fit")
    json.dumps(dm.split_report)  # JSON-ready as it is
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name.startswith("hymtl")]
    return dm.split_report, warnings


EMPTY = {"count": 0, "examples": []}
NO_DUPLICATES = {"count": 0, "by_split": {"val": 0}, "examples": []}


def test_matching_splits_report_nothing(tmp_path, caplog):
    root = tmp_path / "data"
    make_split(root, "train", {"ants": 3, "bees": 3}, 0)
    make_split(root, "val", {"ants": 2, "bees": 2}, 1000)
    report, warnings = _report(root, caplog)
    assert report == {"unknown_val_classes": {**EMPTY, "images": 0}, "train_classes_missing_from_val": EMPTY,
                      "duplicates_across_splits": NO_DUPLICATES,
                      "train_imbalance": {"ratio": 1.0, "largest": ["bees", 3], "smallest": ["ants", 3]}}
    assert warnings == []


def test_val_classes_unknown_to_train_are_reported(tmp_path, caplog):
    root = tmp_path / "data"
    make_split(root, "train", {"ants": 3, "bees": 3}, 0)
    make_split(root, "val", {"ants": 2, "bees": 2, "wasps": 3}, 1000)
    report, warnings = _report(root, caplog)
    assert report["unknown_val_classes"] == {"count": 1, "images": 3, "examples": ["wasps"]}
    assert warnings == ["val: 1 class folder unknown to train left out (3 images): wasps"]


def test_a_train_class_absent_from_val_is_reported(tmp_path, caplog):
    root = tmp_path / "data"
    make_split(root, "train", {"ants": 3, "bees": 3, "wasps": 3}, 0)
    make_split(root, "val", {"ants": 2, "bees": 2}, 1000)
    report, warnings = _report(root, caplog)
    assert report["train_classes_missing_from_val"] == {"count": 1, "examples": ["wasps"]}
    assert report["unknown_val_classes"]["count"] == 0
    assert warnings == ["val: 1 train class without a usable image (macro averages score such a class 0 whenever "
                        "it is predicted): wasps"]


def test_a_val_class_whose_files_are_all_bad_counts_as_absent(tmp_path, caplog):
    root = tmp_path / "data"
    make_split(root, "train", {"ants": 3, "bees": 3}, 0)
    make_split(root, "val", {"ants": 2, "bees": 2}, 1000)
    for path in (root / "val" / "bees").iterdir():
        path.write_bytes(b"")
    report, _ = _report(root, caplog)
    assert report["train_classes_missing_from_val"] == {"count": 1, "examples": ["bees"]}


def test_duplicates_across_train_and_val_and_test_are_found_by_content(tmp_path, caplog):
    root = tmp_path / "data"
    make_split(root, "train", {"ants": 3, "bees": 3}, 0)
    make_split(root, "val", {"ants": 2, "bees": 2}, 1000)
    make_split(root, "test", {"ants": 2, "bees": 2}, 2000)
    shutil.copy(root / "train/ants/ants_0.jpg", root / "val/bees/copy_under_another_name.jpg")  # wrong label too
    shutil.copy(root / "train/bees/bees_1.jpg", root / "test/bees/again.jpg")
    twin = bytearray((root / "train/ants/ants_2.jpg").read_bytes())
    twin[-3] ^= 0xFF  # same size, other bytes: not a duplicate
    (root / "val/ants/same_size.jpg").write_bytes(bytes(twin))
    report, warnings = _report(root, caplog)
    assert report["duplicates_across_splits"] == {
        "count": 2, "by_split": {"val": 1, "test": 1},
        "examples": [["train/ants/ants_0.jpg", "val/bees/copy_under_another_name.jpg"],
                     ["train/bees/bees_1.jpg", "test/bees/again.jpg"]]}
    assert set(report) == {"unknown_val_classes", "train_classes_missing_from_val", "unknown_test_classes",
                           "train_classes_missing_from_test", "duplicates_across_splits", "train_imbalance"}
    assert warnings == ["2 files of the evaluation splits byte-identical to training files (1 in val, 1 in test): "
                        "those metrics include images the model trained on; e.g. val/bees/copy_under_another_name.jpg"
                        " = train/ants/ants_0.jpg"]


def test_duplicates_in_a_flat_folder_split_are_found(tmp_path, caplog):
    root = tmp_path / "flat"
    for name in ("ants", "bees"):
        for i in range(5):
            make_image(root / name / f"{i}.jpg", COLORS[name], seed=i + (50 if name == "bees" else 0))
    for i in range(1, 5):  # every ants file the same bytes: the split puts one copy in val
        shutil.copy(root / "ants/0.jpg", root / f"ants/{i}.jpg")
    report, _ = _report(root, caplog)
    assert report["duplicates_across_splits"]["count"] == 1
    assert report["duplicates_across_splits"]["examples"][0][1].startswith("ants/")


def test_only_files_whose_sizes_collide_are_read_and_large_ones_by_prefix_first(tmp_path, monkeypatch, caplog):
    read: list[tuple[str, int | None]] = []
    real_digest = splits._digest

    def counting(path, limit=None):
        read.append((os.path.basename(path), limit))
        return real_digest(path, limit)

    monkeypatch.setattr(splits, "_digest", counting)
    big = os.urandom(200_000)
    files = {"train/a.bin": b"x" * 10, "train/big.bin": big, "val/b.bin": b"y" * 11,
             "val/big_other_tail.bin": big[:-1] + bytes([big[-1] ^ 1]),
             "val/big_other_head.bin": bytes([big[0] ^ 1]) + big[1:]}
    for rel, data in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(data)
    samples = {rel: folders.Sample(str(tmp_path / rel), 0) for rel in files}
    with caplog.at_level("INFO", logger="hymtl"):
        pairs = splits.find_duplicates([samples["train/a.bin"], samples["train/big.bin"]],
                                        [samples["val/b.bin"], samples["val/big_other_tail.bin"],
                                         samples["val/big_other_head.bin"]])
    assert pairs == []
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("duplicate check:")]
    assert len(summary) == 1 and re.fullmatch(r"duplicate check: 3 files in \d+\.\ds \(\d+\.\d files/s, duplicates 0\)",
                                              summary[0]), summary
    names = {name for name, _ in read}
    assert "a.bin" not in names and "b.bin" not in names  # unique sizes: never opened
    assert ("big_other_head.bin", None) not in read  # its first 64 KiB differ: never hashed whole
    assert ("big_other_tail.bin", None) in read and ("big.bin", None) in read


@pytest.mark.parametrize("layout", ["val", "test"])
def test_split_report_names_are_escaped_and_json_ready(tmp_path, caplog, layout):
    root = tmp_path / "data"
    make_split(root, "train", {"ants": 3, "bees": 3}, 0)
    make_split(root, "val", {"ants": 2, "bees": 2}, 1000)
    if layout == "test":
        make_split(root, "test", {"ants": 2, "bees": 2}, 2000)
    hostile = os.fsdecode(b"w\xe9sp\n[FORGED]")
    make_image(root / layout / hostile / "0.jpg", (1, 2, 3))
    report, warnings = _report(root, caplog)
    assert report[f"unknown_{layout}_classes"]["examples"] == ["w\\xe9sp\\n[FORGED]"]
    json.dumps(report, ensure_ascii=False).encode("utf-8")  # no lone surrogates
    assert all("\n" not in w and w.isprintable() for w in warnings)


@pytest.mark.slow
def test_a_run_records_the_split_report_in_metrics_json(tmp_path):
    from test_train import TINY_MODEL, run_train

    root = tmp_path / "data"
    make_split(root, "train", {"ants": 4, "bees": 4}, 0)
    make_split(root, "val", {"ants": 2, "bees": 2, "wasps": 2}, 1000)
    shutil.copy(root / "train" / "ants" / "ants_0.jpg", root / "val" / "ants" / "copy.jpg")
    result = run_train(*TINY_MODEL, "mode=frozen", "data=folder", f"data.root={root}", "+trainer.fast_dev_run=true",
                       "hydra.run.dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())["split_report"]
    assert report["unknown_val_classes"] == {"count": 1, "images": 2, "examples": ["wasps"]}
    assert report["duplicates_across_splits"]["count"] == 1
    assert "val: 1 class folder unknown to train left out (2 images): wasps" in result.stdout + result.stderr
