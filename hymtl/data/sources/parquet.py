"""``data=parquet``: Parquet files holding the images' bytes — the layout Hugging Face data sets
are published in (``train-00000-of-00002.parquet``, ``validation-…``, ``test-…``).

* the image column holds the encoded file's bytes, or ``{bytes, path}`` structs (Hugging Face's
  ``Image`` feature); decoded later by the same rules as files on disk;
* the label column holds integers whose names are in the schema's metadata (Hugging Face's
  ``ClassLabel``), or strings; for ``task=multilabel``, lists of either, a string of labels
  separated by ``|`` or spaces, or one 0/1 column per label (``data.label_column=[a,b,c]``);
* the split comes from the file name (``train-*``, ``validation-*``/``val-*``/``valid-*``,
  ``test-*``) or a ``split`` column; otherwise it is drawn as for folders.

Read with pyarrow, one column at a time; the bytes stay in memory for the run.
"""

from __future__ import annotations

import glob
import json
import os
import re
from pathlib import Path
from typing import Any, Sequence

from hymtl.data.samples import Sample, bad_class_name, split_label_cell
from hymtl.data.sources.base import DataSource, SourceData, choose_column, label_columns
from hymtl.data.sources.table import LABEL_COLUMNS, SPLIT_NAMES, TRUE_CELLS
from hymtl.errors import DataError, printable

IMAGE_COLUMNS = ("image", "img", "image_bytes", "bytes", "picture")
_FILE_SPLIT = re.compile(r"^(train|training|validation|valid|val|dev|test|testing)(?=[-.])", re.IGNORECASE)


class ParquetSource(DataSource):
    """Images stored in Parquet files.

    Args:
        files: a ``.parquet`` file, a folder of them (searched recursively) or a list of files/globs.
        image_column: the column of image bytes; ``None``: the first of :data:`IMAGE_COLUMNS`.
        label_column: the label column, or a list of 0/1 columns (multi-label); ``None``: the
            first of :data:`~hymtl.data.sources.table.LABEL_COLUMNS` present.
        split_column: the column naming each row's split, used when present (else the file name).
    """

    name = "data=parquet"

    def __init__(self, files: str | os.PathLike | Sequence[str] | None = None, image_column: str | None = None,
                 label_column: str | Sequence[str] | None = None, split_column: str = "split",
                 multilabel: bool = False):
        if not files:
            raise DataError("data=parquet needs its files: data.files=[a.parquet,…] or data.files=FOLDER")
        self.patterns = [str(files)] if isinstance(files, (str, os.PathLike)) else [str(f) for f in files]
        self.image_column = image_column
        self.label_column = label_columns(label_column, multilabel)
        self.split_column = split_column
        self.multilabel = bool(multilabel)

    @property
    def location(self) -> str:
        return ", ".join(self.patterns)

    def files(self) -> list[Path]:
        """The Parquet files named by ``files`` (a folder: every ``*.parquet`` below it), sorted."""
        found: list[Path] = []
        for pattern in self.patterns:
            path = Path(os.path.expanduser(pattern))
            if path.is_dir():
                found += sorted(p for p in path.rglob("*.parquet") if p.is_file())
            elif any(char in pattern for char in "*?["):
                found += sorted(Path(p) for p in glob.glob(os.path.expanduser(pattern), recursive=True))
            elif path.is_file():
                found.append(path)
            else:
                raise DataError(f"Parquet file not found: {printable(path)}")
        if not found:
            raise DataError(f"no .parquet files in {printable(self.location)}")
        return sorted(dict.fromkeys(found))

    def load(self, whole: bool = False) -> SourceData:
        rows: list[tuple[str, Any, tuple[str, ...], str]] = []  # (id, image cell, labels, split)
        for file in self.files():
            rows += self._rows(file)
        if whole:
            rows = [(ident, data, labels, "train") for ident, data, labels, _ in rows]
        if not rows:
            raise DataError(f"no rows in {printable(self.location)}")
        train_labels = sorted({label for _, _, labels, split in rows if split == "train" for label in labels})
        index = {name: i for i, name in enumerate(train_labels)}
        splits: dict[str, list[Sample]] = {"train": []}
        unknown: dict[str, dict[str, int]] = {}
        for ident, data, labels, split in rows:
            for label in labels:
                if label not in index:
                    unknown.setdefault(split, {})
                    unknown[split][label] = unknown[split].get(label, 0) + 1
            known = tuple(sorted(index[label] for label in labels if label in index))
            if self.multilabel:
                splits.setdefault(split, []).append(Sample(ident, known, data))
            elif known:
                splits.setdefault(split, []).append(Sample(ident, known[0], data))
            else:
                splits.setdefault(split, [])
        unknown = {split: unknown.get(split, {}) for split in splits if split != "train"}
        return SourceData(class_names=train_labels, splits=splits, location=self.location,
                          relative_to=os.path.commonpath([str(f.parent) for f in self.files()]),
                          unknown=unknown, noun="label", multilabel=self.multilabel)

    # ------------------------------------------------------------------ one file
    def _rows(self, file: Path) -> list[tuple[str, Any, tuple[str, ...], str]]:
        import pyarrow.parquet as pq

        where = printable(file)
        try:
            table = pq.read_table(file)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise DataError(f"cannot read {where} as Parquet: {printable(str(exc).splitlines()[0] if str(exc) else exc)}") from None
        columns = table.column_names
        image_col = choose_column(columns, self.image_column, IMAGE_COLUMNS, where, "data.image_column", "image bytes")
        label_cols = (self.label_column if isinstance(self.label_column, list)
                      else [choose_column(columns, self.label_column, LABEL_COLUMNS, where, "data.label_column", "labels")])
        for column in label_cols:
            if column not in columns:
                raise DataError(f"{where}: no column {column!r} (data.label_column); columns: {', '.join(columns)}")
        names = _class_label_names(table.schema.metadata or {}, label_cols[0])
        file_split = _split_of_file(file)
        split_cells = table.column(self.split_column).to_pylist() if self.split_column in columns else None
        images = table.column(image_col).to_pylist()
        labels = [table.column(c).to_pylist() for c in label_cols]
        out = []
        for row, cell in enumerate(images):
            ident = f"{file}#row={row}"
            data = _image_bytes(cell, where, row, image_col)
            row_labels = self._labels([column[row] for column in labels], label_cols, names, where, row)
            split = file_split
            if split_cells is not None:
                value = str(split_cells[row] or "").strip().lower()
                if value not in SPLIT_NAMES:
                    raise DataError(f"{where}, row {row}, column {self.split_column!r}: unknown split "
                                    f"{printable(split_cells[row])!r} (train, val or test)")
                split = SPLIT_NAMES[value]
            out.append((ident, data, row_labels, split))
        return out

    def _labels(self, cells: list[Any], columns: list[str], names: list[str] | None, where: str,
                row: int) -> tuple[str, ...]:
        if isinstance(self.label_column, list):  # one 0/1 column per label
            chosen = []
            for column, cell in zip(columns, cells):
                text = str(cell).strip().lower() if cell is not None else ""
                if text not in TRUE_CELLS | {"0", "false", "no", "0.0"}:
                    raise DataError(f"{where}, row {row}, column {column!r}: expected 0 or 1, got {printable(cell)!r}")
                if text in TRUE_CELLS:
                    chosen.append(column)
            return tuple(chosen)
        cell, column = cells[0], columns[0]
        values = cell if isinstance(cell, (list, tuple)) else [cell]
        labels: list[str] = []
        for value in values:
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise DataError(f"{where}, row {row}, column {column!r}: a label must be an integer or a string, "
                                f"got {type(value).__name__}")
            if isinstance(value, int):
                if names is None or not 0 <= value < len(names):
                    raise DataError(f"{where}, row {row}, column {column!r}: label {value} has no name in the file's "
                                    f"metadata ({len(names or [])} names)")
                labels.append(names[value])
            elif self.multilabel and not isinstance(cell, (list, tuple)):
                labels += split_label_cell(value)
            elif value.strip():
                labels.append(value.strip())
        if not labels and not self.multilabel:
            raise DataError(f"{where}, row {row}, column {column!r}: empty label")
        if len(labels) > 1 and not self.multilabel:
            raise DataError(f"{where}, row {row}, column {column!r}: {len(labels)} labels in one row: that is "
                            "multi-label data, use task=multilabel")
        for label in labels:
            if bad_class_name(label):
                raise DataError(f"{where}, row {row}, column {column!r}: the label {printable(label)!r} holds a control "
                                "character (labels are saved with the checkpoint and shown on one line)")
        return tuple(sorted(set(labels)))


def _image_bytes(cell: Any, where: str, row: int, column: str) -> bytes:
    """The encoded image of a cell: bytes, or a ``{bytes, path}`` struct (Hugging Face's ``Image``)."""
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    if isinstance(cell, (bytes, bytearray, memoryview)) and len(cell):
        return bytes(cell)
    raise DataError(f"{where}, row {row}, column {column!r}: expected the image's bytes or a struct with bytes, got "
                    f"{'empty bytes' if isinstance(cell, (bytes, bytearray)) else type(cell).__name__}")


def _class_label_names(metadata: dict, column: str) -> list[str] | None:
    """The names of an integer label column from Hugging Face's schema metadata
    (``{"info": {"features": {column: {"_type": "ClassLabel", "names": […]}}}}``; a
    ``Sequence`` of ``ClassLabel`` for multi-label lists)."""
    raw = metadata.get(b"huggingface")
    if not raw:
        return None
    try:
        features = json.loads(raw).get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return None
    feature = features.get(column) or {}
    for _ in range(3):  # Sequence(ClassLabel) / List(ClassLabel) nest the names one level down
        if isinstance(feature, dict) and isinstance(feature.get("names"), list):
            return [str(name) for name in feature["names"]]
        feature = feature.get("feature") if isinstance(feature, dict) else None
        if isinstance(feature, list) and feature:
            feature = feature[0]
    return None


def _split_of_file(file: Path) -> str:
    """``train-00000-of-00001.parquet`` -> ``"train"`` (also a parent folder named exactly
    ``train``, ``test``, ``validation``…); else train."""
    match = _FILE_SPLIT.match(file.name)
    if match:
        return SPLIT_NAMES[match.group(1).lower()]
    return SPLIT_NAMES.get(file.parent.name.lower(), "train")
