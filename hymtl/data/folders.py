"""Image folder layouts: scanning, class order, splits and the hidden-file rule.

Layout rules (a superset of torchvision's ``ImageFolder``):

* ``root/train/<class>/…`` and ``root/{val,valid,validation}/<class>/…``; ``root/test/<class>/…``
  when present is the test split, otherwise val doubles as test (the ants/bees case);
* ``root/<class>/…`` only: split deterministically and stratified by ``val_fraction`` and ``seed``.

Class order is the sorted class-folder names. Hidden files and folders (and ``__MACOSX``) are
ignored; files nested below a class folder belong to that class. File names may hold any byte
the OS allows (they are escaped by :func:`hymtl.errors.printable` wherever shown); a class
folder name must be showable on one line (:func:`check_class_names`).

What does not match between the splits (evaluation classes unknown to train, train classes an
evaluation split lacks, byte-identical files across splits) is :func:`compare_splits`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterator, Mapping, Sequence

from hymtl.errors import DataError, printable
from hymtl.progress import Progress

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# torchvision.datasets.folder.IMG_EXTENSIONS: ImageFolder's rules (no .gif), for exact tutorial counts
TORCHVISION_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VAL_DIR_NAMES = ("val", "valid", "validation")


@dataclass(frozen=True)
class Sample:
    path: str
    label: int


@dataclass(frozen=True)
class SplitLayout:
    """Where each split comes from in a root folder."""

    train: Path | None  # None: a flat <class>/ root that must be split
    val: Path | None
    test: Path | None

    @property
    def test_source(self) -> str:
        return "test" if self.test is not None else "val"


def is_visible(name: str) -> bool:
    """Not a hidden file or folder (``.name``) nor macOS's ``__MACOSX`` archive folder."""
    return not name.startswith(".") and name != "__MACOSX"


def is_image_file(path: str | os.PathLike, extensions: Collection[str] | None = None) -> bool:
    """A visible file whose lower-cased extension is in ``extensions`` (default: ``IMAGE_EXTENSIONS``)."""
    name = os.path.basename(path)
    return is_visible(name) and os.path.splitext(name)[1].lower() in (extensions or IMAGE_EXTENSIONS)


# control characters, undecodable bytes (surrogate escapes) and line/paragraph separators: a name
# holding one cannot be shown as itself on one line (a log, a table, a prediction's JSON)
_NOT_ONE_LINE = frozenset({"Cc", "Cs", "Zl", "Zp"})


def check_class_names(folder: str | os.PathLike, names: Sequence[str]) -> None:
    """Refuse (one :class:`DataError` line) a class folder whose name holds a control character
    (newline, tab, ESC), bytes that are not valid UTF-8 or a line separator: the class name is
    saved with the checkpoint and shown in logs, figures and predictions, where an escaped
    stand-in would be a different name. File names are free; class names must be renamed."""
    for name in names:
        if any(unicodedata.category(char) in _NOT_ONE_LINE for char in name):
            raise DataError(f"class folder '{printable(os.path.join(folder, name))}' has a name with a control "
                            f"character or bytes that are not UTF-8: rename it (class names are saved with the "
                            f"checkpoint and shown in logs and predictions)")


def find_classes(folder: str | os.PathLike) -> list[str]:
    """Sorted names of the visible sub-folders: the class names."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and is_visible(e.name))


def walk_images(folder: str | os.PathLike, extensions: Collection[str] | None = None) -> Iterator[str]:
    """The image files below ``folder``, recursively (hidden entries skipped, symlinked folders
    not followed), sorted: folder by folder, names in order."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if is_visible(d))
        yield from (os.path.join(dirpath, f) for f in sorted(filenames) if is_image_file(f, extensions))


def scan_split(
    folder: str | os.PathLike, class_names: Sequence[str], extensions: Collection[str] | None = None
) -> list[Sample]:
    """All image files below ``folder/<class>/`` (recursively, hidden entries skipped), sorted."""
    samples: list[Sample] = []
    for label, name in enumerate(class_names):
        class_dir = Path(folder) / name
        if class_dir.is_dir():
            samples.extend(Sample(path, label) for path in walk_images(class_dir, extensions))
    return samples


def resolve_layout(root: str | os.PathLike) -> SplitLayout:
    """Find the train/val/test folders of ``root`` (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {printable(root)}")
    subdirs = {d.lower(): root / d for d in find_classes(root)}
    val = next((subdirs[n] for n in VAL_DIR_NAMES if n in subdirs), None)
    if "train" in subdirs:
        return SplitLayout(train=subdirs["train"], val=val, test=subdirs.get("test"))
    return SplitLayout(train=None, val=None, test=subdirs.get("test"))


def stratified_split(samples: Sequence[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic per-class split: the same ``seed`` gives the same split on every machine."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be between 0 and 1, got {val_fraction}")
    by_class: dict[int, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.path):
        by_class.setdefault(s.label, []).append(s)
    train, val = [], []
    for label in sorted(by_class):
        items = by_class[label]
        random.Random(f"{seed}:{label}").shuffle(items)
        n_val = max(1, round(len(items) * val_fraction)) if len(items) > 1 else 0
        val += items[:n_val]
        train += items[n_val:]
    return train, val


# --------------------------------------------------------------------------- split mismatches
EXAMPLES = 5  # names or file pairs kept as examples in the split report
_PREFIX_BYTES = 1 << 16


def _digest(path: str, limit: int | None = None) -> str | None:
    """SHA-256 of the first ``limit`` bytes of ``path`` (all with ``None``); ``None`` if unreadable."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            if limit is not None:
                digest.update(f.read(limit))
            else:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    except OSError:
        return None
    return digest.hexdigest()


def find_duplicates(train: Sequence[Sample], other: Sequence[Sample]) -> list[tuple[str, str]]:
    """``(train path, other path)`` for every file of ``other`` whose bytes equal a training
    file's. Bounded cost: only files whose sizes occur on both sides are read, first their first
    64 KiB, and only those whose prefixes also collide are hashed whole."""

    def sizes(samples: Sequence[Sample]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        for s in samples:
            try:
                out.setdefault(os.stat(s.path).st_size, []).append(s.path)
            except OSError:
                continue
        return out

    train_sizes, other_sizes = sizes(train), sizes(other)
    colliding = sorted(train_sizes.keys() & other_sizes.keys())
    pairs: list[tuple[str, str]] = []
    if not colliding:
        return pairs
    total = sum(len(train_sizes[size]) + len(other_sizes[size]) for size in colliding)
    with Progress("duplicate check", total=total, unit="files", log=log) as progress:
        for size in colliding:
            stages: list[int | None] = [_PREFIX_BYTES, None] if size > _PREFIX_BYTES else [None]
            left, right = train_sizes[size], other_sizes[size]
            progress.update(len(left) + len(right))
            for limit in stages:  # keep, stage by stage, only the files whose digests still collide
                left_d = {p: d for p in left if (d := _digest(p, limit)) is not None}
                right_d = {p: d for p in right if (d := _digest(p, limit)) is not None}
                common = set(left_d.values()) & set(right_d.values())
                left = [p for p in left if left_d.get(p) in common]
                right = [p for p in right if right_d.get(p) in common]
            by_digest = {left_d[p]: p for p in left}
            pairs += [(by_digest[right_d[p]], p) for p in right]
            progress.update(0, duplicates=len(pairs))
    return pairs


def compare_splits(train: Sequence[Sample], evaluation: dict[str, Sequence[Sample]], class_names: Sequence[str],
                   split_folders: dict[str, str | os.PathLike | None], root: str | os.PathLike,
                   extensions: Collection[str] | None = None) -> dict:
    """What does not match between the training split and the evaluation splits (``{"val": …,
    "test": …}``, the samples kept for the run), as a JSON-ready dict of stable keys (per split
    ``s``): ``unknown_<s>_classes`` (class folders of that split, ``split_folders[s]``, that train has
    no usable class for: their ``images`` are left out), ``train_classes_missing_from_<s>`` (classes of the run with no
    usable image in that split), ``duplicates_across_splits`` (files of that split byte-identical
    to a training file). Counts and up to ``EXAMPLES`` examples each; names and paths (relative
    to ``root``) escaped by :func:`hymtl.errors.printable`."""

    def rel(path: str) -> str:
        try:
            return printable(os.path.relpath(path, root))
        except ValueError:
            return printable(path)

    report: dict = {}
    duplicates: dict = {"count": 0, "by_split": {}, "examples": []}
    for split, samples in evaluation.items():
        folder = split_folders.get(split)
        unknown = [n for n in find_classes(folder) if n not in class_names] if folder is not None else []
        images = sum(1 for n in unknown for _ in walk_images(Path(folder) / n, extensions))
        report[f"unknown_{split}_classes"] = {"count": len(unknown), "images": images,
                                              "examples": [printable(n) for n in unknown[:EXAMPLES]]}
        present = {s.label for s in samples}
        missing = [n for i, n in enumerate(class_names) if i not in present]
        report[f"train_classes_missing_from_{split}"] = {"count": len(missing),
                                                         "examples": [printable(n) for n in missing[:EXAMPLES]]}
        pairs = find_duplicates(train, samples)
        duplicates["count"] += len(pairs)
        duplicates["by_split"][split] = len(pairs)
        room = EXAMPLES - len(duplicates["examples"])
        duplicates["examples"] += [[rel(a), rel(b)] for a, b in pairs[:max(0, room)]]
    report["duplicates_across_splits"] = duplicates
    return report


def content_fingerprint(root: str | os.PathLike, splits: Mapping[str, Sequence[Sample] | None]) -> dict[str, dict]:
    """What a run trains and is scored on, for a resume to compare: per split, its file count and
    a SHA-256 over (path relative to ``root``, size, label) of its files, in order. The same names
    and sizes with other pixels go unseen; a file added, removed, renamed, resized or relabelled
    changes it. One ``stat`` per file."""
    fingerprint = {}
    for split, samples in splits.items():
        if samples is None:
            continue
        digest = hashlib.sha256()
        for sample in samples:
            try:
                size = os.stat(sample.path).st_size
            except OSError:
                size = -1
            name = os.path.relpath(sample.path, root)
            digest.update(f"{name}\0{size}\0{sample.label}\n".encode("utf-8", "surrogateescape"))
        fingerprint[split] = {"files": len(samples), "sha256": digest.hexdigest()}
    return fingerprint


def fingerprint_differences(saved: Mapping[str, Mapping], now: Mapping[str, Mapping]) -> list[str]:
    """``"train: 244 files, now 250"`` / ``"val: other files (153 both times)"`` for each split of
    :func:`content_fingerprint` that differs between ``saved`` and ``now``."""
    differences = []
    for split in sorted(set(saved) | set(now)):
        was, current = saved.get(split), now.get(split)
        if was == current:
            continue
        if was is None or current is None:
            differences.append(f"{split}: {'no split' if was is None else str(was['files']) + ' files'}, now "
                               f"{'no split' if current is None else str(current['files']) + ' files'}")
        elif was["files"] != current["files"]:
            differences.append(f"{split}: {was['files']} files, now {current['files']}")
        else:
            differences.append(f"{split}: other files ({was['files']} both times)")
    return differences
