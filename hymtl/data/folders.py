"""Image folder layouts: scanning, class order, splits and the hidden-file rule.

Layout rules (a superset of torchvision's ``ImageFolder``):

* ``root/train/<class>/…`` and ``root/{val,valid,validation}/<class>/…``; ``root/test/<class>/…``
  when present is the test split, otherwise val doubles as test (the ants/bees case);
* ``root/<class>/…`` only: split deterministically and stratified by ``val_fraction`` and ``seed``.

Class order is the sorted class-folder names. Hidden files and folders (and ``__MACOSX``) are
ignored; files nested below a class folder belong to that class.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterator, Sequence

from hymtl.errors import DataError

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
        raise DataError(f"data folder not found: {root}")
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
