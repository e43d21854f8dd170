"""``data=table``: a folder of images plus a label file (CSV, TSV or JSON lines).

The shape of Kaggle sets and most labelling tools' exports (fastai's ``from_csv``, Hugging
Face's ``imagefolder`` metadata file)::

    filename,label              filename,labels             filename,beach,sunset,people
    img/001.jpg,ants            001.jpg,beach sunset        001.jpg,1,1,0
    img/002.jpg,bees            002.jpg,people|beach        002.jpg,0,0,1

Paths are relative to the label file's folder (or ``data.image_root``) and may not leave it.
An optional ``split`` column (``train``/``val``/``test``) fixes the splits; otherwise they are
drawn as for folders (stratified, seeded). Every problem with the file itself is one
:class:`~hymtl.errors.DataError` naming the file, the row and the column; a missing or broken
image is skipped later with its reason in ``skipped.txt``, as folders do.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Sequence

from hymtl.data.samples import Sample, bad_class_name, split_label_cell
from hymtl.data.sources.base import DataSource, SourceData, choose_column, inside, label_columns
from hymtl.errors import DataError, printable

PATH_COLUMNS = ("filename", "path", "file", "image", "image_path", "file_name")
LABEL_COLUMNS = ("label", "labels", "class", "tags", "category")
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
               "dev": "val", "test": "test", "testing": "test"}
TRUE_CELLS, FALSE_CELLS = {"1", "true", "yes", "1.0"}, {"0", "false", "no", "0.0", ""}


class TableSource(DataSource):
    """Images listed in a label file.

    Args:
        file: the CSV (``,``), TSV (``.tsv``/``.tab``: tab) or JSON-lines (``.jsonl``/``.ndjson``) file.
        path_column: the column of image paths; ``None``: the first of :data:`PATH_COLUMNS` present.
        label_column: the column of labels, or a list of 0/1 columns (one per label: multi-label);
            ``None``: the first of :data:`LABEL_COLUMNS` present.
        image_root: the folder paths are relative to; ``None``: the label file's folder.
        split_column: the column naming each row's split, used when present.
        multilabel: labels are sets (``task=multilabel``): one column of labels separated by
            ``|`` or spaces, or a list of 0/1 columns. An image with no label is legal then.
    """

    name = "data=table"

    def __init__(self, file: str | os.PathLike | None = None, path_column: str | None = None,
                 label_column: str | Sequence[str] | None = None, image_root: str | os.PathLike | None = None,
                 split_column: str = "split", multilabel: bool = False):
        if file is None or not str(file).strip():
            raise DataError("data=table needs the label file: data.file=PATH (CSV, TSV or JSON lines)")
        self.file = Path(os.path.expanduser(str(file)))
        self.path_column = path_column
        self.label_column = label_columns(label_column, multilabel)
        self.image_root = Path(os.path.expanduser(str(image_root))) if image_root else self.file.parent
        self.split_column = split_column
        self.multilabel = bool(multilabel)

    @property
    def location(self) -> str:
        return str(self.file)

    def load(self, whole: bool = False) -> SourceData:
        header, rows = self._read()
        where = printable(self.file)
        path_col = self._column(header, self.path_column, PATH_COLUMNS, "data.path_column", "image paths")
        label_cols = (self.label_column if isinstance(self.label_column, list)
                      else [self._column(header, self.label_column, LABEL_COLUMNS, "data.label_column", "labels")])
        for column in label_cols:
            if column not in header:
                raise DataError(f"{where}: no column {column!r} (data.label_column); columns: {', '.join(header)}")
        split_col = self.split_column if self.split_column in header else None
        entries: dict[str, tuple[tuple[str, ...], str, int]] = {}  # path -> (labels, split, row)
        for number, row in rows:
            path = self._path(row, path_col, number)
            labels = self._labels(row, label_cols, number)
            split = self._split(row, split_col, number) if split_col and not whole else "train"
            seen = entries.get(path)
            if seen is not None and (seen[0], seen[1]) != (labels, split):
                raise DataError(f"{where}, row {number}, column {path_col!r}: {printable(row[path_col])} is listed again "
                                f"with other labels or split than in row {seen[2]} ({', '.join(seen[0]) or 'none'})")
            entries.setdefault(path, (labels, split, number))
        if not entries:
            raise DataError(f"{where} has a header but no rows")
        return self._source_data(entries)

    # ------------------------------------------------------------------ reading
    def _read(self) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
        """The header and ``(row number, {column: cell})`` of every row (numbered as a spreadsheet
        shows them: the header is row 1)."""
        where = printable(self.file)
        try:
            raw = self.file.read_bytes()
        except FileNotFoundError:
            raise DataError(f"label file not found: {where}") from None
        except (IsADirectoryError, PermissionError, OSError) as exc:
            raise DataError(f"cannot read the label file {where}: {exc.strerror or exc}") from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            raise DataError(f"{where}, row {line}: text that is not UTF-8 (byte 0x{raw[exc.start]:02x}); "
                            "save the file as UTF-8") from None
        if self.file.suffix.lower() in (".jsonl", ".ndjson", ".json"):
            return self._json_lines(text)
        delimiter = "\t" if self.file.suffix.lower() in (".tsv", ".tab") else ","
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        header = next(reader, None)
        if not header or not any(cell.strip() for cell in header):
            raise DataError(f"{where} is empty: expected a header row (e.g. filename,label) and one row per image")
        header = [cell.strip() for cell in header]
        rows = []
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(f"{where}, row {reader.line_num}: {len(row)} cells for {len(header)} columns")
            rows.append((reader.line_num, dict(zip(header, row))))
        return header, rows

    def _json_lines(self, text: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
        where = printable(self.file)
        header: list[str] = []
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}, row {number}: not JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}, row {number}: expected a JSON object per line")
            header += [key for key in record if key not in header]
            rows.append((number, {key: _cell(value) for key, value in record.items()}))
        if not rows:
            raise DataError(f"{where} is empty: expected one JSON object per image")
        return header, rows

    def _column(self, header: list[str], chosen: str | None, defaults: Sequence[str], key: str, what: str) -> str:
        return choose_column(header, chosen, defaults, printable(self.file), key, what)

    def _path(self, row: dict[str, str], column: str, number: int) -> str:
        cell = (row.get(column) or "").strip()
        if not cell:
            raise DataError(f"{printable(self.file)}, row {number}, column {column!r}: empty image path")
        return inside(str(self.image_root), cell, f"{printable(self.file)}, row {number}, column {column!r}")

    def _labels(self, row: dict[str, str], columns: list[str], number: int) -> tuple[str, ...]:
        where = f"{printable(self.file)}, row {number}"
        if len(columns) > 1 or isinstance(self.label_column, list):  # one 0/1 column per label
            labels = []
            for column in columns:
                cell = (row.get(column) or "").strip().lower()
                if cell not in TRUE_CELLS | FALSE_CELLS:
                    raise DataError(f"{where}, column {column!r}: expected 0 or 1, got {printable(row.get(column))!r}")
                if cell in TRUE_CELLS:
                    labels.append(column)
            return tuple(labels)
        column = columns[0]
        cell = row.get(column) or ""
        labels = split_label_cell(cell) if self.multilabel else ((cell.strip(),) if cell.strip() else ())
        if not labels and not self.multilabel:
            raise DataError(f"{where}, column {column!r}: empty label")
        for label in labels:
            if bad_class_name(label):
                raise DataError(f"{where}, column {column!r}: the label {printable(label)!r} holds a control "
                                "character (labels are saved with the checkpoint and shown on one line)")
        return labels

    def _split(self, row: dict[str, str], column: str, number: int) -> str:
        cell = (row.get(column) or "").strip().lower()
        if cell not in SPLIT_NAMES:
            raise DataError(f"{printable(self.file)}, row {number}, column {column!r}: unknown split "
                            f"{printable(row.get(column))!r} (train, val or test)")
        return SPLIT_NAMES[cell]

    def _source_data(self, entries: dict[str, tuple[tuple[str, ...], str, int]]) -> SourceData:
        """Class names from the training rows (every row without a split column); labels of
        evaluation rows unknown to train are reported and left out."""
        train_labels = {label for labels, split, _ in entries.values() if split == "train" for label in labels}
        names = sorted(train_labels)
        index = {name: i for i, name in enumerate(names)}
        splits: dict[str, list[Sample]] = {"train": []}
        unknown: dict[str, dict[str, int]] = {}
        for path, (labels, split, _) in sorted(entries.items()):
            bucket = splits.setdefault(split, [])
            known = [label for label in labels if label in index]
            for label in labels:
                if label not in index:
                    unknown.setdefault(split, {}).setdefault(label, 0)
                    unknown[split][label] += 1
            if self.multilabel:
                bucket.append(Sample(path, tuple(sorted(index[label] for label in known))))
            elif known:
                bucket.append(Sample(path, index[known[0]]))
        unknown = {split: unknown.get(split, {}) for split in splits if split != "train"}
        return SourceData(class_names=names, splits=splits, location=str(self.file), relative_to=str(self.image_root),
                          unknown=unknown, noun="label", multilabel=self.multilabel)


def _cell(value) -> str:
    """A JSON value as the text a CSV cell would hold (lists of labels joined with ``|``)."""
    if isinstance(value, list):
        return "|".join(str(v) for v in value)
    if isinstance(value, bool):
        return "1" if value else "0"
    return "" if value is None else str(value)
