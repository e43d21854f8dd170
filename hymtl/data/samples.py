"""A sample — one image and its target — and the rules every room shares about them.

A :class:`Sample` is a file (``path``) or bytes held by a source (``data``, with ``path``
naming where they came from: ``train-0.parquet#row=17``), and its target: one class index, or
for multi-label data a tuple of class indices (possibly empty: all negatives).
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from dataclasses import dataclass, field
from typing import Sequence, Union

#: a target: one class index, or the indices of every label of a multi-label image
Target = Union[int, tuple]

@dataclass(frozen=True)
class Sample:
    """One image and its target. ``data``: the image file's bytes when the source holds them
    (Parquet); ``path`` then names their origin, for messages, ``skipped.txt`` and the cache key."""

    path: str
    label: Target
    data: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def labels(self) -> tuple[int, ...]:
        """The target as a tuple of class indices (one for a single-label sample)."""
        return tuple(self.label) if isinstance(self.label, tuple) else (int(self.label),)

    def relabel(self, mapping: dict[int, int]) -> "Sample":
        """The same image with its class indices mapped (indices missing from ``mapping`` dropped)."""
        if isinstance(self.label, tuple):
            return Sample(self.path, tuple(mapping[i] for i in self.label if i in mapping), self.data)
        return Sample(self.path, mapping[int(self.label)], self.data)


class TargetEncoder:
    """A sample's target as a DataLoader gives it: the class index (single-label), or a float
    multi-hot vector of ``num_classes`` (multi-label: what BCE-with-logits takes)."""

    def __init__(self, num_classes: int | None = None):
        self.num_classes = num_classes

    def __call__(self, sample: "Sample"):
        if not isinstance(sample.label, tuple):
            return sample.label
        import torch

        target = torch.zeros(int(self.num_classes or 0), dtype=torch.float32)
        if sample.label:
            target[list(sample.label)] = 1.0
        return target


# --------------------------------------------------------------------------- label rules
# control characters, undecodable bytes (surrogate escapes) and line/paragraph separators: a name
# holding one cannot be shown as itself on one line (a log, a table, a prediction's JSON)
_NOT_ONE_LINE = frozenset({"Cc", "Cs", "Zl", "Zp"})


def bad_class_name(name: str) -> bool:
    """A class name that cannot be shown as itself on one line (saved with the checkpoint)."""
    return any(unicodedata.category(char) in _NOT_ONE_LINE for char in name)


#: what separates the labels of one multi-label cell: "beach sunset" or "beach|sunset"
LABEL_SEPARATORS = ("|", " ", ",", ";")


def split_label_cell(cell: str) -> tuple[str, ...]:
    """``"beach|sunset"`` / ``"beach sunset"`` -> ``("beach", "sunset")``: the labels of a
    multi-label cell (``|`` first, then white space, ``,`` or ``;``); empty -> ``()``."""
    text = cell.strip()
    for separator in LABEL_SEPARATORS:
        if separator in text:
            return tuple(sorted({part.strip() for part in text.split(separator) if part.strip()}))
    return (text,) if text else ()


def content_fingerprint(relative_to: str, splits: dict[str, Sequence[Sample] | None]) -> dict[str, dict]:
    """What a run trains and is scored on, for a resume to compare: per split, its image count
    and a SHA-256 over (path relative to ``relative_to``, size, target) of its images, in order.
    A file added, removed, renamed, resized or relabelled changes it (one ``stat`` per file; the
    bytes a source holds are hashed, which is cheap in memory)."""
    fingerprint = {}
    for split, samples in splits.items():
        if samples is None:
            continue
        digest = hashlib.sha256()
        for sample in samples:
            if sample.data is not None:
                size = f"{len(sample.data)}:{hashlib.sha256(sample.data).hexdigest()[:16]}"
                name = sample.path
            else:
                try:
                    size = str(os.stat(sample.path).st_size)
                except OSError:
                    size = "-1"
                name = os.path.relpath(sample.path, relative_to)
            label = sample.label if not isinstance(sample.label, tuple) else ",".join(map(str, sample.label))
            digest.update(f"{name}\0{size}\0{label}\n".encode("utf-8", "surrogateescape"))
        fingerprint[split] = {"files": len(samples), "sha256": digest.hexdigest()}
    return fingerprint
