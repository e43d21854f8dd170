"""Splits: the stratified seeded split, k-fold, and the split report.

* :func:`stratified_split` — per class (a multi-label image: its first label), deterministic:
  the same ``seed`` gives the same split on every machine;
* :func:`kfold_split` — fold ``i`` of ``K`` stratified folds of the same kind (``data.folds``,
  ``data.fold``): a fold's val never overlaps its train, and the folds cover every image once;
* :func:`compare_splits` — what does not match between train and val/test (labels unknown to
  train, classes missing from a split, byte-identical files across splits), and how unbalanced
  the training classes are.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from typing import Sequence

from hymtl.data.samples import Sample
from hymtl.errors import DataError, printable
from hymtl.progress import Progress

log = logging.getLogger(__name__)

#: the ratio of the largest to the smallest training class above which a run says so
IMBALANCE_RATIO = 5.0


def _stratum(sample: Sample) -> int:
    """The class a sample is stratified by: its label, a multi-label image's first (-1: none)."""
    labels = sample.labels
    return labels[0] if labels else -1


def _by_class(samples: Sequence[Sample], seed: int) -> dict[int, list[Sample]]:
    """Samples per stratum, each list shuffled by a seed of its own (order of the input ignored)."""
    by_class: dict[int, list[Sample]] = {}
    for s in sorted(samples, key=lambda s: s.path):
        by_class.setdefault(_stratum(s), []).append(s)
    for label, items in by_class.items():
        random.Random(f"{seed}:{label}").shuffle(items)
    return by_class


def stratified_split(samples: Sequence[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic per-class split: the same ``seed`` gives the same split on every machine."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be between 0 and 1, got {val_fraction}")
    by_class = _by_class(samples, seed)
    train, val = [], []
    for label in sorted(by_class):
        items = by_class[label]
        n_val = max(1, round(len(items) * val_fraction)) if len(items) > 1 else 0
        val += items[:n_val]
        train += items[n_val:]
    return train, val


def kfold_split(samples: Sequence[Sample], folds: int, fold: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """``(train, val)`` of fold ``fold`` of ``folds`` stratified folds: each class's images,
    shuffled by ``seed``, are dealt to the folds in turn, so every fold holds about ``1/folds``
    of every class and each image is in exactly one fold's val."""
    if isinstance(folds, bool) or int(folds) != folds or folds < 2:
        raise DataError(f"data.folds must be an integer >= 2, got {folds!r}")
    if isinstance(fold, bool) or int(fold) != fold or not 0 <= fold < folds:
        raise DataError(f"data.fold must be an integer from 0 to {folds - 1} (data.folds={folds}), got {fold!r}")
    if len(samples) < folds:
        raise DataError(f"data.folds={folds} needs at least {folds} images, the pool has {len(samples)}")
    train, val = [], []
    dealt = 0  # continue the deal across classes, so that small classes do not all land in fold 0
    by_class = _by_class(samples, seed)
    for label in sorted(by_class):
        for item in by_class[label]:
            (val if dealt % folds == fold else train).append(item)
            dealt += 1
    return train, val


def class_counts(samples: Sequence[Sample], num_classes: int) -> list[int]:
    """Images per class (a multi-label image counts for each of its labels)."""
    counts = [0] * num_classes
    for sample in samples:
        for label in sample.labels:
            counts[label] += 1
    return counts


def imbalance(counts: Sequence[int], class_names: Sequence[str]) -> dict:
    """``{"ratio", "largest", "smallest"}`` of the training classes (JSON-ready); ratio ``None``
    when a class has no image."""
    present = [(n, name) for n, name in zip(counts, class_names)]
    largest, smallest = max(present), min(present)
    ratio = round(largest[0] / smallest[0], 2) if smallest[0] else None
    return {"ratio": ratio, "largest": [printable(largest[1]), largest[0]], "smallest": [printable(smallest[1]), smallest[0]]}


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
                   unknown: dict[str, dict[str, int]], root: str | os.PathLike) -> dict:
    """What does not match between the training split and the evaluation splits (``{"val": …,
    "test": …}``, the samples kept for the run), as a JSON-ready dict of stable keys (per split
    ``s``): ``unknown_<s>_classes`` (the source's classes of that split that train has no usable
    class for — ``unknown[s]``, name -> images: their images are left out),
    ``train_classes_missing_from_<s>`` (classes of the run with no usable image in that split),
    ``duplicates_across_splits`` (files of that split byte-identical to a training file), and
    ``train_imbalance`` (:func:`imbalance`). Counts and up to ``EXAMPLES`` examples each; names and
    paths (relative to ``root``) escaped by :func:`hymtl.errors.printable`."""

    def rel(path: str) -> str:
        try:
            return printable(os.path.relpath(path, root))
        except ValueError:
            return printable(path)

    report: dict = {}
    duplicates: dict = {"count": 0, "by_split": {}, "examples": []}
    for split, samples in evaluation.items():
        names = sorted(unknown.get(split, {}))
        report[f"unknown_{split}_classes"] = {"count": len(names), "images": sum(unknown.get(split, {}).values()),
                                              "examples": [printable(n) for n in names[:EXAMPLES]]}
        present = {label for s in samples for label in s.labels}
        missing = [n for i, n in enumerate(class_names) if i not in present]
        report[f"train_classes_missing_from_{split}"] = {"count": len(missing),
                                                         "examples": [printable(n) for n in missing[:EXAMPLES]]}
        pairs = find_duplicates(train, samples)
        duplicates["count"] += len(pairs)
        duplicates["by_split"][split] = len(pairs)
        room = EXAMPLES - len(duplicates["examples"])
        duplicates["examples"] += [[rel(a), rel(b)] for a, b in pairs[:max(0, room)]]
    report["duplicates_across_splits"] = duplicates
    report["train_imbalance"] = imbalance(class_counts(train, len(class_names)), class_names)
    return report
