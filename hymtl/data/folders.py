"""Image folder layouts: scanning, class order and the hidden-file rule (read by
:class:`hymtl.data.sources.FolderSource`).

Layout rules (a superset of torchvision's ``ImageFolder``):

* ``root/train/<class>/…`` and ``root/{val,valid,validation}/<class>/…``; ``root/test/<class>/…``
  when present is the test split, otherwise val doubles as test (the ants/bees case);
* ``root/<class>/…`` only: split deterministically and stratified by ``val_fraction`` and ``seed``.

Class order is the sorted class-folder names. Hidden files and folders (and ``__MACOSX``) are
ignored; files nested below a class folder belong to that class. File names may hold any byte
the OS allows (they are escaped by :func:`hymtl.errors.printable` wherever shown); a class
folder name must be showable on one line (:func:`check_class_names`).

The split itself, k-fold and the split report are :mod:`hymtl.data.splits`; the resume check's
fingerprint comparison (:func:`fingerprint_differences`) is here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterator, Mapping, Sequence

from hymtl.data.samples import Sample, bad_class_name, content_fingerprint  # noqa: F401 (re-exported)
from hymtl.errors import DataError, printable

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# torchvision.datasets.folder.IMG_EXTENSIONS: ImageFolder's rules (no .gif), for exact tutorial counts
TORCHVISION_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VAL_DIR_NAMES = ("val", "valid", "validation")


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


def check_class_names(folder: str | os.PathLike, names: Sequence[str]) -> None:
    """Refuse (one :class:`DataError` line) a class folder whose name holds a control character
    (newline, tab, ESC), bytes that are not valid UTF-8 or a line separator: the class name is
    saved with the checkpoint and shown in logs, figures and predictions, where an escaped
    stand-in would be a different name. File names are free; class names must be renamed."""
    for name in names:
        if bad_class_name(name):
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
