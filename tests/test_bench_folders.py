"""benchmarks/folders.py: small builds are byte-identical, read by hymtl's scanner as asked,
the imbalance is the one asked for, and only a finished build is ever taken as complete."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_script
from PIL import Image

from hymtl.data.folders import find_classes, resolve_layout, scan_split
from hymtl.errors import DataError

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "folders.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT, "bench_folders")


def tree(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (hidden ones too) by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_counts(root: Path) -> tuple[list[str], dict[str, dict[str, int]]]:
    """Class names and per-split, per-class image counts, as hymtl itself scans the folder."""
    layout = resolve_layout(root)
    classes = find_classes(layout.train)
    counts = {}
    for split, folder in (("train", layout.train), ("val", layout.val)):
        samples = scan_split(folder, classes)
        counts[split] = {c: sum(1 for s in samples if s.label == i) for i, c in enumerate(classes)}
    return classes, counts


def test_procedural_small_builds_are_byte_identical_and_read_as_asked(bench, tmp_path):
    a, built_a = bench.build_folder("ten_class_3k", tmp_path / "a", source=None, small=3)
    b, built_b = bench.build_folder("ten_class_3k", tmp_path / "b", source=None, small=3)
    assert built_a and built_b
    files_a, files_b = tree(a), tree(b)
    assert files_a == files_b  # README.txt and .build.json included: no dates, no paths
    assert len([name for name in files_a if name.endswith(".jpg")]) == 10 * 3 * 2
    classes, counts = read_counts(a)
    assert classes == sorted(bench.TEN_CLASSES) and len(classes) == 10
    assert counts == {split: {c: 3 for c in classes} for split in ("train", "val")}
    with Image.open(a / "train" / "polygon5" / "polygon5_0002.jpg") as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (224, 224))
    # each image has its own random stream: a bigger build starts with the same files
    c, _ = bench.build_folder("ten_class_3k", tmp_path / "c", source=None, small=4)
    assert (c / "val/rings/rings_0002.jpg").read_bytes() == files_a["val/rings/rings_0002.jpg"]
    assert files_a["train/rings/rings_0000.jpg"] != files_a["train/rings/rings_0001.jpg"]


def test_many_classes_has_distinct_sorted_classes(bench, tmp_path):
    root, _ = bench.build_folder("many_classes", tmp_path, source=None, small=1)
    classes, counts = read_counts(root)
    assert len(classes) == len(set(bench.MANY_CLASSES)) >= 20
    assert classes == sorted(bench.MANY_CLASSES)
    assert all(n == 1 for split in counts.values() for n in split.values())


@pytest.mark.parametrize("name", ["gray_lines", "crops"])
def test_derived_small_builds_are_byte_identical(bench, tmp_path, real_data, name):
    a, _ = bench.build_folder(name, tmp_path / "a", source=real_data, small=2)
    b, _ = bench.build_folder(name, tmp_path / "b", source=real_data, small=2)
    assert tree(a) == tree(b)
    classes, counts = read_counts(a)
    assert classes == ["ants", "bees"]
    assert counts == {"train": {"ants": 2, "bees": 2}, "val": {"ants": 2, "bees": 2}}
    source = sorted((real_data / "train" / "ants").iterdir())[0]
    made = a / "train" / "ants" / (source.stem + ".jpg")
    assert made.read_bytes() != source.read_bytes()  # an edited image, not a copy
    with Image.open(made) as img:
        assert img.mode == "RGB" and min(img.size) == bench.SOURCE_SHORT
        if name == "gray_lines":
            r, g, b_ = img.split()
            assert r.tobytes() == g.tobytes() == b_.tobytes() or max(
                abs(x - y) for x, y in zip(r.tobytes(), b_.tobytes())) <= 8  # gray (JPEG rounding)


def test_imbalanced_is_one_to_five_in_train_and_balanced_in_val(bench, tmp_path, real_data):
    root, _ = bench.build_folder("imbalanced", tmp_path, source=real_data)
    _, counts = read_counts(root)
    source_ants = len(list((real_data / "train" / "ants").iterdir()))
    assert counts["train"]["ants"] == source_ants
    assert counts["train"]["bees"] == round(source_ants / bench.IMBALANCE)
    assert counts["train"]["ants"] / counts["train"]["bees"] == pytest.approx(5, abs=0.25)
    assert counts["val"]["ants"] == counts["val"]["bees"] == min(
        len(list((real_data / "val" / c).iterdir())) for c in ("ants", "bees"))
    # byte copies of source files, a subset of the source's bees
    for path in (root / "train" / "bees").iterdir():
        assert path.read_bytes() == (real_data / "train" / "bees" / path.name).read_bytes()
    small, _ = bench.build_folder("imbalanced", tmp_path / "small", source=real_data, small=10)
    assert read_counts(small)[1]["train"] == {"ants": 10, "bees": 2}


def test_a_complete_build_is_kept_and_one_with_other_params_replaced(bench, tmp_path):
    root, built = bench.build_folder("many_classes", tmp_path, source=None, small=1)
    marker = (root / bench.MARKER).stat().st_mtime_ns
    again, built_again = bench.build_folder("many_classes", tmp_path, source=None, small=1)
    assert built and not built_again and again == root
    assert (root / bench.MARKER).stat().st_mtime_ns == marker
    _, rebuilt = bench.build_folder("many_classes", tmp_path, source=None, small=2)
    assert rebuilt and all(n == 2 for n in read_counts(root)[1]["train"].values())
    assert [p.name for p in tmp_path.iterdir()] == ["many_classes"]  # the old build is gone


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_temp_folder_left_by_a_killed_build_is_not_taken_as_complete(bench, tmp_path):
    # a finished-looking build (images and a matching .build.json) under a killed process's temp name
    donor, _ = bench.build_folder("many_classes", tmp_path / "donor", source=None, small=1)
    left = tmp_path / "out" / f".many_classes.partial-{_dead_pid()}-abc"
    left.parent.mkdir()
    donor.rename(left)
    (left / "train" / "T" / "T_0000.jpg").write_bytes(b"half a file")
    root, built = bench.build_folder("many_classes", tmp_path / "out", source=None, small=1)
    assert built and root == tmp_path / "out" / "many_classes"
    assert not left.exists()  # cleaned up: its process is gone
    with Image.open(root / "train" / "T" / "T_0000.jpg") as img:
        img.load()


def test_an_interrupted_build_leaves_nothing_that_looks_built(bench, tmp_path, monkeypatch):
    spec = bench.FOLDERS["many_classes"]

    def interrupted(ctx):
        spec.make(ctx)  # every image written, then the process is stopped before the rename
        raise KeyboardInterrupt

    monkeypatch.setitem(bench.FOLDERS, "many_classes", dataclasses.replace(spec, make=interrupted))
    with pytest.raises(KeyboardInterrupt):
        bench.build_folder("many_classes", tmp_path, source=None, small=1)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setitem(bench.FOLDERS, "many_classes", spec)
    _, built = bench.build_folder("many_classes", tmp_path, source=None, small=1)
    assert built


def test_a_folder_not_built_here_is_refused_not_overwritten(bench, tmp_path):
    mine = tmp_path / "ten_class_3k" / "train" / "x"
    mine.mkdir(parents=True)
    (mine / "keep.jpg").write_bytes(b"user data")
    with pytest.raises(DataError, match="not built by benchmarks/folders.py"):
        bench.build_folder("ten_class_3k", tmp_path, source=None, small=1)
    assert (mine / "keep.jpg").read_bytes() == b"user data"


@pytest.mark.slow
def test_cli_prints_the_table_and_user_errors_are_one_line_exit_2(tmp_path):
    ok = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--only", "many_classes",
                         "--small", "1"], capture_output=True, text=True, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "| many_classes | 24 | 24 | 24 | 1/1 | 1/1 | built |" in ok.stdout
    readme = (tmp_path / "many_classes" / "README.txt").read_text()
    assert "seed: 1234" in readme and "--small 1" in readme
    assert json.loads((tmp_path / "many_classes" / ".build.json").read_text())["small"] == 1
    bad = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path), "--only", "crops",
                          "--source", str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1
