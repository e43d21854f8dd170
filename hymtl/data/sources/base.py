"""What every data source gives the rest of hymtl: samples, class names, the splits it knows.

A source (:class:`DataSource`) turns its description — a folder of class folders, a label file,
Parquet files — into a :class:`SourceData`. Everything after that (the file check, the split,
k-fold, the split report, the feature cache, resume's data check, export's parity images,
``hymtl.eval``) works from the samples alone; none of it looks at a layout.

The samples are :class:`hymtl.data.samples.Sample` (a file or bytes, and its target).
"""

from __future__ import annotations

import inspect
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Sequence

from hymtl.data.samples import Sample
from hymtl.errors import DataError, printable

@dataclass
class SourceData:
    """What :meth:`DataSource.load` returns.

    Args:
        class_names: the source's candidate classes; labels index into it. Classes without a
            usable training image are dropped later (with a line in ``skipped.txt``).
        splits: ``"train"`` always; ``"val"``/``"test"`` when the source names them (folders
            ``val/``, a ``split`` column, Parquet file names); missing ones are split off train.
        location: the folder or file shown in messages; ``relative_to``: what paths in reports
            and the content fingerprint are relative to.
        unknown: per evaluation split, class names of that split unknown to train (``noun``
            names them: "class folder", "label") and how many images they hold: left out, reported.
        multilabel: the targets are tuples of labels.
        classes_at: where the training classes are named, when not ``location`` (``root/train``).
    """

    class_names: list[str]
    splits: dict[str, list[Sample]]
    location: str
    relative_to: str
    unknown: dict[str, dict[str, int]] = field(default_factory=dict)
    noun: str = "class"
    multilabel: bool = False
    classes_at: str | None = None

    @property
    def class_location(self) -> str:
        """Where the training classes are named (``root/train`` for folders; the label file)."""
        return self.classes_at or self.location


class DataSource(ABC):
    """A kind of data (a module of :mod:`hymtl.data.sources` and a YAML in ``conf/data/``).

    Subclasses take their description as keyword arguments (``data.*`` in the config), and
    implement :meth:`load`; :meth:`prepare` fetches what is missing (rank 0 first)."""

    #: shown in messages: "data=table"
    name: str = "source"

    def prepare(self) -> None:
        """Download or otherwise make the data available (called before :meth:`load`)."""

    @abstractmethod
    def load(self, whole: bool = False) -> SourceData:
        """Read the description: samples, class names, the splits the source names.
        ``whole``: every image of the data as one ``"train"`` pool, its classes named by all of
        them, whatever split each belongs to (``hymtl.eval`` scoring a held-out folder whole)."""

    @property
    @abstractmethod
    def location(self) -> str:
        """The folder or file the data comes from, for messages."""

    @classmethod
    def settings(cls) -> list[str]:
        """The keyword arguments the source takes (``data.<key>`` in the config)."""
        return [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "multilabel")]


def label_columns(label_column, multilabel: bool) -> str | list[str] | None:
    """``data.label_column`` as a source takes it: one column name, ``None`` (the source finds
    one), or a list of 0/1 columns, one per label — which is multi-label data and names no
    empty column (one :class:`DataError` line otherwise)."""
    if isinstance(label_column, (str, type(None))):
        return label_column
    columns = list(label_column)
    if not all(isinstance(c, str) and c.strip() for c in columns):
        raise DataError(f"data.label_column={columns} holds an empty name: name one 0/1 column per label")
    if not multilabel:
        raise DataError(f"data.label_column={columns} lists one 0/1 column per label: that is "
                        "multi-label data, use task=multilabel (or name one column of labels)")
    return columns


def choose_column(columns: list[str], chosen: str | None, defaults: Sequence[str], where: str, key: str, what: str) -> str:
    """The column ``chosen`` (``key``), else the first of ``defaults`` present (any letter case);
    one :class:`DataError` line naming ``where`` and the columns otherwise."""
    if chosen is not None:
        if chosen not in columns:
            raise DataError(f"{where}: no column {chosen!r} ({key}); columns: {', '.join(columns)}")
        return chosen
    lowered = {name.lower(): name for name in columns}
    found = next((lowered[name] for name in defaults if name in lowered), None)
    if found is None:
        raise DataError(f"{where}: no column of {what} (looked for {', '.join(defaults)}; columns: "
                        f"{', '.join(columns)}): set {key}")
    return found


def check_settings(source: type[DataSource], given: dict, where: str) -> None:
    """A :class:`DataError` naming a key of ``given`` that ``source`` does not take, with the
    nearest of its settings (``data.labels_csv`` -> ``did you mean data.label_column?``)."""
    import difflib

    known = source.settings()
    for key in given:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=2, cutoff=0.5)
            hint = f"; did you mean {' or '.join('data.' + n for n in near)}?" if near else ""
            raise DataError(f"data.{key} is not a setting of {where}{hint} (its settings: "
                            f"{', '.join('data.' + k for k in known)})")


def inside(root: str, relative: str, where: str) -> str:
    """``root/relative`` as a normalised absolute path, refused (one :class:`DataError` naming
    ``where``) when it leaves ``root``: ``../`` or an absolute path elsewhere."""
    root = os.path.abspath(root)
    candidate = os.path.normpath(os.path.join(root, relative))
    if os.path.commonpath([root, candidate]) != root:
        raise DataError(f"{where}: the path {printable(relative)!r} leaves the image root {printable(root)} "
                        "(set data.image_root to a folder that holds it)")
    return candidate
