"""``data=folder`` / ``data=hymenoptera``: class folders (the layouts of :mod:`hymtl.data.folders`).

``root/{train,val|valid|validation[,test]}/<class>/…``, or ``root/<class>/…`` (then split by
``data.val_fraction`` and ``seed``). A missing ``root`` with a ``download_url`` is downloaded
and checked against its manifest first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from hymtl.data.download import MANIFEST_DIR, download_and_extract, exclusive_lock
from hymtl.data.folders import IMAGE_EXTENSIONS, VAL_DIR_NAMES, check_class_names, find_classes, resolve_layout, scan_split, walk_images
from hymtl.data.sources.base import DataSource, SourceData
from hymtl.errors import DataError, printable


class FolderSource(DataSource):
    """Class folders below ``root``.

    Args:
        root: the folder.
        download_url, sha256, manifest: where to fetch ``root`` from when it is missing, and how
            to check it (the zip's SHA-256; a per-file manifest in ``hymtl/manifests``).
        extensions: image file extensions to read (any case, dot optional); default
            :data:`~hymtl.data.folders.IMAGE_EXTENSIONS`.
    """

    name = "data=folder"

    def __init__(self, root: str | os.PathLike = "data/hymenoptera_data", download_url: str | None = None,
                 sha256: str | None = None, manifest: str | None = None,
                 extensions: Sequence[str] | None = None, multilabel: bool = False):
        if root is None or not str(root).strip():
            raise DataError("data.root is empty: name the image folder (data.root=PATH)")
        self.root = Path(os.path.expanduser(str(root)))
        self.download_url = download_url
        self.sha256 = sha256
        self.manifest = MANIFEST_DIR / manifest if manifest and not os.path.isabs(manifest) else manifest
        self.extensions = frozenset("." + e.lower().lstrip(".") for e in extensions) if extensions else IMAGE_EXTENSIONS
        if multilabel:
            raise DataError(f"task=multilabel needs several labels per image, but class folders ({printable(self.root)}) "
                            "give one label per image: use a label file (data=table) or Parquet (data=parquet) "
                            "with a labels column, or task=multiclass")

    @property
    def location(self) -> str:
        return str(self.root)

    def prepare(self) -> None:
        """Download the folder when it is missing and a URL is known."""
        if self.root.is_dir():
            return
        if not self.download_url:
            raise DataError(f"data folder not found: {printable(self.root)}")
        # torchrun starts every rank at once: the first to take the lock downloads, the others
        # wait and then find the folder in place
        with exclusive_lock(self.root.parent / f".{self.root.name}.lock"):
            if self.root.is_dir():
                return
            download_and_extract(self.download_url, self.root, sha256=self.sha256,
                                 manifest=Path(self.manifest) if self.manifest else None)

    def load(self, whole: bool = False) -> SourceData:
        if whole:
            return self._load_whole()
        layout = resolve_layout(self.root)
        source = layout.train if layout.train is not None else self.root
        names = [n for n in find_classes(source) if layout.train is not None or n.lower() != "test"]
        if len(names) < 2:
            raise DataError(f"need at least two class folders in {printable(source)}, found {names}")
        check_class_names(source, names)
        splits = {"train": scan_split(source, names, self.extensions)}
        unknown: dict[str, dict[str, int]] = {}
        for split, folder in (("val", layout.val), ("test", layout.test)):
            if folder is None:
                continue
            splits[split] = scan_split(folder, names, self.extensions)
            unknown[split] = {name: sum(1 for _ in walk_images(Path(folder) / name, self.extensions))
                              for name in find_classes(folder) if name not in names}
        return SourceData(class_names=names, splits=splits, location=str(self.root), relative_to=str(self.root),
                          unknown=unknown, noun="class folder", classes_at=str(source))

    def _load_whole(self) -> SourceData:
        """Every image below ``root`` by its class folder: ``<class>/`` at the top, or below any
        split folder (``train/``, ``val/``…, ``test/``: a folder holding only ``test/`` too)."""
        if not self.root.is_dir():
            raise DataError(f"data folder not found: {printable(self.root)}")
        top = find_classes(self.root)
        split_names = {"train", "test", *VAL_DIR_NAMES}
        folders = [self.root / d for d in top if d.lower() in split_names] or [self.root]
        names = sorted({n for folder in folders for n in find_classes(folder)
                        if folder != self.root or n.lower() not in split_names})
        if not names:
            raise DataError(f"no class folders in {printable(self.root)} (expected <class>/ or <split>/<class>/ folders)")
        check_class_names(self.root, names)
        samples = [s for folder in folders for s in scan_split(folder, names, self.extensions)]
        return SourceData(class_names=names, splits={"train": samples}, location=str(self.root),
                          relative_to=str(self.root), noun="class folder")
