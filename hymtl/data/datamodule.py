"""Any data source as a LightningDataModule: the samples of :mod:`hymtl.data.sources`, the
splits of :mod:`hymtl.data.splits`, the checked files of :mod:`hymtl.data.images`, the loaders
of :mod:`hymtl.data.loaders`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from hydra.utils import get_class
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Sampler, WeightedRandomSampler

from hymtl.backbones import Preprocessing, preprocessing_of
from hymtl.config import checked_number
from hymtl.data.folders import fingerprint_differences
from hymtl.data.images import (
    RUNTIME_SUFFIX,
    AugmentRecipe,
    BadFile,
    ImageSampleDataset,
    build_transforms,
    check_files,
    format_skipped,
    summarize_skipped,
)
from hymtl.data.loaders import SkippingDataLoader, collate_skipping, default_num_workers, worker_init
from hymtl.data.samples import Sample, content_fingerprint
from hymtl.data.sources import DataSource, FolderSource, SourceData
from hymtl.data.sources.base import check_settings
from hymtl.data.splits import IMBALANCE_RATIO, class_counts, compare_splits, kfold_split, stratified_split
from hymtl.errors import DataError, printable
from hymtl.fileio import atomic_write_text

log = logging.getLogger(__name__)

SAMPLERS = ("shuffle", "balanced")


def _examples(entry: dict) -> str:
    """``a, b, c`` (``, …`` when the report holds more than its examples)."""
    more = ", …" if entry["count"] > len(entry["examples"]) else ""
    return ", ".join(entry["examples"]) + more


def make_source(source: str | DataSource | None, options: dict, multilabel: bool) -> DataSource:
    """The :class:`DataSource` a config names (``source: hymtl.data.sources.TableSource`` and the
    ``data.*`` keys that are not the datamodule's own), or the one given. Unknown keys are one
    error line naming the nearest setting."""
    if isinstance(source, DataSource):
        if options:
            raise DataError(f"data.{next(iter(options))} is not a setting of the datamodule, and a built source "
                            "was given")
        return source
    cls = FolderSource if source is None else get_class(str(source))
    if not (isinstance(cls, type) and issubclass(cls, DataSource)):
        raise DataError(f"data.source must name a hymtl.data.sources.DataSource class, got {source!r}")
    check_settings(cls, options, cls.name)
    return cls(**options, multilabel=multilabel)


# --------------------------------------------------------------------------- the DataModule
class ImageFolderDataModule(LightningDataModule):
    """Train/val/test splits of any data source (:mod:`hymtl.data.sources`): class folders by
    default (``root=``), a label file, Parquet files.

    Args:
        root: a folder of class folders (the shorthand of ``source=None``): a setting of the source.
        source: the source's class (``hymtl.data.sources.TableSource``) or a built
            :class:`~hymtl.data.sources.DataSource`; ``None``: class folders. Every keyword this
            class does not take is the source's (``root``, ``file``, ``label_column``, …).
        batch_size: per-device batch size.
        num_workers: DataLoader workers; ``"auto"``: one per usable core (max 8).
        val_fraction, seed: the split when the source names no val split.
        folds, fold: k-fold cross-validation: val is fold ``fold`` of ``folds`` stratified folds
            of the train (and given val) images; a given test split stays out of every fold.
        sampler: ``"shuffle"`` (default) or ``"balanced"``: each class drawn equally often per
            epoch (sampling with replacement, weights 1/class size; Lightning shards it under DDP).
        multilabel: targets are label sets (``task=multilabel`` sets it).
        whole: every image of the data is the test split, whatever its layout (``hymtl.eval``
            scoring a held-out folder or label file); no train or val split.
        class_names: the classes, in order, the labels must mean (a checkpoint's): the data's
            labels are mapped by name; images of other classes are left out and reported.
        backbone: the backbone's registry name: the images are prepared as it expects
            (:func:`hymtl.backbones.preprocessing_of`), unless ``preprocessing`` is given.
        preprocessing: a :class:`Preprocessing` (or its dict) to use instead.
        strict: decode every file before training and stop with a :class:`DataError` at the
            first sign of a bad file or an unusable class (default: skip and report them).
        skipped_file: where to write the skipped files (``reason<TAB>path``); conf/ sets
            ``<run dir>/skipped.txt``.
        features: a :class:`hymtl.features.FeatureServing` (the :class:`~hymtl.features.FeatureServer`
            of ``feature_cache:``): while it says so (the backbone is frozen), the train/val/test
            loaders give cached backbone features instead of images. The contract both ways is
            stated in :mod:`hymtl.features`: this class is its :class:`~hymtl.features.ServedData`
            and offers the callbacks :class:`~hymtl.features.ServesFeatures`. (Not annotated
            here: ``hymtl.features`` imports ``hymtl.data``, and the config check reads these
            annotations.)
        augment: the training split's :class:`~hymtl.data.images.AugmentRecipe` (``conf/augment/``;
            ``None``: the default recipe); with cached features, it makes the augmented views.
        persistent_workers: keep the workers from one epoch to the next. Off by default: a run
            resumed from ``last.ckpt`` is then exact with workers too — each epoch's workers are
            seeded from the main process's random state (which the checkpoint holds), not from
            where the first epoch's workers left off. Costs a worker start per loader and epoch
            (about 0.1-0.2 s for 2 workers, forked).
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        batch_size: int = 32,
        num_workers: int | str = "auto",
        val_fraction: float = 0.2,
        seed: int = 0,
        folds: int | None = None,
        fold: int = 0,
        sampler: str | None = "shuffle",
        multilabel: bool = False,
        whole: bool = False,
        class_names: Sequence[str] | None = None,
        preprocessing: Preprocessing | dict | None = None,
        backbone: str | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        strict: bool = False,
        skipped_file: str | os.PathLike | None = None,
        features=None,
        augment: AugmentRecipe | None = None,
        source: str | DataSource | None = None,
        **source_options: Any,
    ):
        super().__init__()
        if root is not None:  # the class-folder shorthand: ImageFolderDataModule("path/to/images")
            source_options["root"] = root
        # the rules of these keys: hymtl.config.NUMBER_RULES
        self.batch_size = checked_number("data.batch_size", batch_size)
        workers = checked_number("data.num_workers", num_workers)
        self.num_workers = default_num_workers() if workers == "auto" else workers
        self.val_fraction = checked_number("data.val_fraction", val_fraction)
        self.seed = checked_number("data.seed", seed)
        self.folds = None if folds in (None, 0, 1) else folds
        self.fold = fold
        self.sampler = sampler or "shuffle"
        if self.sampler not in SAMPLERS:
            raise DataError(f"data.sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        self.multilabel = bool(multilabel)
        self.whole = bool(whole)
        self.fixed_classes = [str(c) for c in class_names] if class_names is not None else None
        self.source = make_source(source, dict(source_options), self.multilabel)
        if isinstance(preprocessing, dict):
            preprocessing = Preprocessing.from_dict(preprocessing)
        self.preprocessing = preprocessing if preprocessing is not None or not backbone else preprocessing_of(backbone)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers
        self.strict = bool(strict)
        self.skipped_file = skipped_file
        self.features = features
        self.augment = augment
        self.skipped: list[BadFile] = []  # left out by the up-front check (runtime failures: skipped.txt)
        self._content: dict[str, dict] | None = None  # content_fingerprint, once scanned
        self.split_report: dict = {}  # what does not match between the splits: see _report_splits
        self._class_names: list[str] | None = None
        self._given_test = False
        self._relative_to = self.location
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.test_samples: list[Sample] = []

    # -- discovery -----------------------------------------------------------------------
    @property
    def location(self) -> str:
        """The folder or file the data comes from (messages, ``eval.json``)."""
        return self.source.location

    @property
    def root(self) -> Path:
        """The image folder of class-folder data; for other sources, where the data comes from."""
        return Path(self.source.location)

    def prepare_data(self) -> None:
        """Download what the source needs (rank 0 only, by Lightning; under torchrun every rank,
        one at a time: the source's lock)."""
        self.source.prepare()

    @property
    def class_names(self) -> list[str]:
        """Sorted names of the training classes that hold at least one usable image."""
        if self._class_names is None:
            self._discover()
        return self._class_names

    @property
    def class_counts(self) -> list[int]:
        """Training images per class (a multi-label image counts for each of its labels): what
        ``model.class_weights=auto`` weighs the loss by."""
        return class_counts(self.train_samples, len(self.class_names))

    def _discover(self) -> None:
        """Load the source, check every file (see :func:`check_image_file`), drop classes without
        a usable training image, split what the source did not; record and report what was left out."""
        data = self.source.load(whole=self.whole)
        if len(data.class_names) < 2 and not data.multilabel and self.fixed_classes is None:
            raise DataError(f"need at least two classes in {printable(data.class_location)}, found {data.class_names}")
        every = [s for samples in data.splits.values() for s in samples]
        reasons = check_files(every, decode=self.strict)
        bad = [BadFile(s.path, reasons[s.path]) for s in every if s.path in reasons]
        if self.fixed_classes is not None:
            usable, relabel = self._given_classes(data, reasons)
        else:
            counts = class_counts([s for s in data.splits["train"] if s.path not in reasons], len(data.class_names))
            empty = [name for name, n in zip(data.class_names, counts) if n == 0]
            bad += [BadFile(os.path.join(data.class_location, name), f"{data.noun} without a usable image: class ignored")
                    for name in empty]
            usable = [name for name, n in zip(data.class_names, counts) if n > 0]
        self.skipped = bad
        self._write_skipped(bad, len(every))
        self._say_skipped(bad, len(every))
        if len(usable) < 2 and not (data.multilabel and usable):
            found = f"only {usable}" if usable else "none"
            raise DataError(f"need at least two classes with usable images in {printable(data.class_location)}, found "
                            f"{found} ({printable(summarize_skipped(bad))})" + self._see_skipped())
        if self.fixed_classes is None:
            relabel = {data.class_names.index(name): i for i, name in enumerate(usable)}

        def keep(samples: list[Sample]) -> list[Sample]:
            return [s.relabel(relabel) for s in samples
                    if s.path not in reasons and (isinstance(s.label, tuple) or s.label in relabel)]

        given = {split: keep(samples) for split, samples in data.splits.items()}
        self._class_names = usable
        self._relative_to = data.relative_to
        self._assign_splits(given, data)
        if not self.whole:
            self._report_splits(data)

    def _given_classes(self, data: SourceData, reasons: dict[str, str]) -> tuple[list[str], dict[int, int]]:
        """The fixed classes (a checkpoint's) and the map from the data's label indices to them;
        the data's classes the model does not know are said once (their images left out)."""
        usable = list(self.fixed_classes)
        relabel = {i: usable.index(name) for i, name in enumerate(data.class_names) if name in usable}
        foreign = [name for i, name in enumerate(data.class_names) if i not in relabel]
        if not relabel:
            raise DataError(f"none of the classes of {printable(data.location)} ({', '.join(map(printable, foreign))}) "
                            f"is one of the model's ({', '.join(map(printable, usable))})")
        if foreign:
            images = sum(1 for samples in data.splits.values() for s in samples
                         if s.path not in reasons and any(data.class_names[i] in foreign for i in s.labels))
            log.warning("%d %s%s of %s unknown to the model left out (%d images): %s", len(foreign), data.noun,
                        "s" if len(foreign) != 1 else "", printable(data.location), images,
                        ", ".join(printable(n) for n in foreign[:5]) + (", …" if len(foreign) > 5 else ""))
        return usable, relabel

    def _assign_splits(self, given: dict[str, list[Sample]], data: SourceData) -> None:
        """train/val/test from what the source gave: its val, k-fold over train (+ its val), or a
        stratified split of train; without a test split, val doubles as test (said once).
        ``whole``: every image is the test split."""
        if self.whole:
            self._given_test = True
            self.train_samples, self.val_samples = [], []
            self.test_samples = [s for samples in given.values() for s in samples]
            return
        train, val, test = given["train"], given.get("val"), given.get("test")
        if self.folds:
            pool = train + (val or [])
            train, val = kfold_split(pool, self.folds, self.fold, self.seed)
            log.info("k-fold: fold %s of %d (%d train, %d val images)", self.fold, self.folds, len(train), len(val))
        elif val is None:
            train, val = stratified_split(train, self.val_fraction, self.seed)
        self._given_test = test is not None
        self.train_samples, self.val_samples = train, val
        self.test_samples = test if test is not None else list(val)
        if test is None:
            log.info("no test split in %s: the val split doubles as the test split", printable(data.location))

    def _say_skipped(self, bad: Sequence[BadFile], checked: int) -> None:
        if not bad:
            return
        first = bad[0]
        if self.strict:
            raise DataError(f"data.strict=true: {printable(summarize_skipped(bad))} in {printable(self.location)}; "
                            f"first: {printable(first.path)} ({printable(first.reason)})" + self._see_skipped())
        log.warning("%s of %d in %s%s", printable(summarize_skipped(bad)), checked, printable(self.location),
                    self._see_skipped())
        for b in bad[:20]:
            log.warning("  skipped %s: %s", printable(b.path), printable(b.reason))
        if len(bad) > 20:
            log.warning("  ... and %d more", len(bad) - 20)

    def _report_splits(self, data: SourceData) -> None:
        """Fill :attr:`split_report` (:func:`hymtl.data.splits.compare_splits`) and say each
        mismatch in one warning line: evaluation classes unknown to train (their images are left
        out), classes of the run without an image in an evaluation split (macro averages score
        such a class 0 whenever the model predicts it), files of val/test byte-identical to
        training files (evaluation on seen images), training classes more unbalanced than 1:5."""
        evaluation = {"val": self.val_samples}
        if self._given_test:
            evaluation["test"] = self.test_samples
        report = compare_splits(self.train_samples, evaluation, self._class_names, data.unknown, data.relative_to)
        self.split_report = report
        for split in evaluation:
            unknown = report[f"unknown_{split}_classes"]
            if unknown["count"]:
                log.warning("%s: %d %s%s unknown to train left out (%d images): %s", split, unknown["count"], data.noun,
                            "s" if unknown["count"] != 1 else "", unknown["images"], _examples(unknown))
            missing = report[f"train_classes_missing_from_{split}"]
            if missing["count"]:
                log.warning("%s: %d train class%s without a usable image (macro averages score such a class 0 "
                            "whenever it is predicted): %s", split, missing["count"],
                            "es" if missing["count"] != 1 else "", _examples(missing))
        duplicates = report["duplicates_across_splits"]
        if duplicates["count"]:
            where = ", ".join(f"{n} in {split}" for split, n in duplicates["by_split"].items() if n)
            first = duplicates["examples"][0]
            log.warning("%d file%s of the evaluation splits byte-identical to training files (%s): those metrics "
                        "include images the model trained on; e.g. %s = %s", duplicates["count"],
                        "s" if duplicates["count"] != 1 else "", where, first[1], first[0])
        ratio = report["train_imbalance"]["ratio"]
        if ratio is not None and ratio > IMBALANCE_RATIO and self.sampler != "balanced":
            largest, smallest = report["train_imbalance"]["largest"], report["train_imbalance"]["smallest"]
            log.warning("the training classes are unbalanced 1:%.1f (%s: %d images, %s: %d): accuracy can hide a "
                        "class the model never gets right; data.sampler=balanced draws each class equally often, "
                        "model.class_weights=auto weighs the loss by inverse class frequency", ratio, largest[0],
                        largest[1], smallest[0], smallest[1])

    def _see_skipped(self) -> str:
        return f"; list in {printable(self.skipped_file)}" if self.skipped_file else ""

    def _write_skipped(self, bad: Sequence[BadFile], checked: int) -> None:
        if not self.skipped_file:
            return
        trainer = getattr(self, "trainer", None)
        if trainer is not None and not trainer.is_global_zero:
            return
        header = (f"files left out of the run: reason<TAB>path ({len(bad)} of {checked} checked in "
                  f"{printable(self.location)})\n"
                  f"decode failures during training are appended with the suffix '{RUNTIME_SUFFIX.strip()}'")
        atomic_write_text(self.skipped_file, format_skipped(bad, header))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        if self.preprocessing is None:
            raise DataError("ImageFolderDataModule needs the backbone's name (backbone=) or its preprocessing")
        if self._class_names is None:  # scanned and checked once, also when setup runs per stage
            self._discover()
        needed = (("test", self.test_samples),) if self.whole or stage in ("test", "predict") else (
            ("train", self.train_samples), ("val", self.val_samples))
        for split, samples in needed:
            if not samples:
                raise DataError(f"no images in the {split} split of {printable(self.location)}")

    # -- resume --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the content fingerprint of the splits (image counts and a
        SHA-256 of names, sizes and targets: :func:`~hymtl.data.samples.content_fingerprint`)."""
        return {"content": self.content_fingerprint()} if self._class_names is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume (Lightning restores this from the checkpoint after the scan): refuse, with
        one line, images other than those the checkpoint was trained and scored on — the same
        data with files added, removed, renamed, resized or relabelled is other data."""
        saved = state_dict.get("content")
        if not saved:  # a checkpoint of an older hymtl
            return
        differences = fingerprint_differences(saved, self.content_fingerprint())
        if differences:
            raise DataError(f"cannot resume: the images of {printable(self.location)} are not the ones this checkpoint "
                            f"was trained and scored on ({'; '.join(differences)}); start a new run for new data")

    def content_fingerprint(self) -> dict[str, dict]:
        """:func:`~hymtl.data.samples.content_fingerprint` of the train, val and (a real) test split,
        computed once per run (one ``stat`` per file)."""
        if self._content is None:
            test = self.test_samples if self._given_test else None
            self._content = content_fingerprint(
                self._relative_to, {"train": self.train_samples, "val": self.val_samples, "test": test})
        return self._content

    @property
    def test_split_name(self) -> str:
        """``"test"`` when the source has one, else ``"val"`` (val doubles as test); ``"all"``
        when every image is scored (``whole``)."""
        if self.whole:
            return "all"
        return "test" if self._given_test else "val"

    # -- loaders -------------------------------------------------------------------------
    def _loader(self, samples: Sequence[Sample], train: bool) -> DataLoader:
        # big JPEGs: reduced-scale decoding
        dataset = ImageSampleDataset(samples, build_transforms(self.preprocessing, train=train, augment=self.augment),
                                     skip_bad=True, failure_log=self.skipped_file,
                                     decode_size=self.preprocessing.resize_size, num_classes=self.num_classes)
        sampler = self._train_sampler(samples) if train else self._eval_sampler(dataset)
        # persistent workers would make exact resume impossible: their random streams (the
        # augmentations) would run on from epoch 0 in an uninterrupted run but start afresh at
        # the resumed epoch, and the iterator made at resume draws one more seed from the global
        # RNG (the shuffling then differs too); see persistent_workers in the class docstring
        return SkippingDataLoader(
            dataset,
            batch_size=self.batch_size,
            collate_fn=collate_skipping,
            worker_init_fn=worker_init,
            shuffle=train and sampler is None,
            sampler=sampler,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def _feature_loader(self, samples: Sequence[Sample], train: bool, stage: str = "fit") -> DataLoader:
        dataset = self.features.dataset(self, samples, train, stage)
        # tensors already in memory: worker processes would only add start-up time
        sampler = self._train_sampler([samples[int(i)] for i in dataset.index]) if train else self._eval_sampler(dataset)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=train and sampler is None, num_workers=0,
                          sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        if self.serves_features("fit"):
            return self._feature_loader(self.train_samples, train=True)
        return self._loader(self.train_samples, train=True)

    def val_dataloader(self) -> DataLoader:
        if self.serves_features("fit"):
            return self._feature_loader(self.val_samples, train=False)
        return self._loader(self.val_samples, train=False)

    def test_dataloader(self) -> DataLoader:
        if self.serves_features("test"):
            return self._feature_loader(self.test_samples, train=False, stage="test")
        return self._loader(self.test_samples, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_samples, train=False)

    def serves_features(self, stage: str) -> bool:
        """Whether the ``stage`` ("fit", "test", "predict") loaders give features right now
        (the :class:`~hymtl.features.FeatureServer` decides)."""
        return self.features is not None and self.features.serves(self.trainer, stage)

    def test_images(self, positions: Sequence[int]) -> torch.Tensor:
        """The test split's images at ``positions``, prepared as for evaluation ``(n, 3, S, S)``:
        what the test figures show when the test batches held features (a file that no longer
        decodes shows blank)."""
        size = self.preprocessing.input_size
        dataset = ImageSampleDataset([self.test_samples[int(i)] for i in positions],
                                     build_transforms(self.preprocessing, train=False), skip_bad=True,
                                     decode_size=self.preprocessing.resize_size, num_classes=self.num_classes)
        images = [item[0] if item is not None else torch.zeros(3, size, size) for item in dataset]
        return torch.stack(images) if images else torch.zeros(0, 3, size, size)

    def _train_sampler(self, samples: Sequence[Sample]) -> Sampler | None:
        """``data.sampler=balanced``: every class drawn equally often per epoch — with
        replacement, each image weighted by 1 / its class's size (a multi-label image by its
        rarest label's); an epoch keeps the split's length. ``None``: plain shuffling.
        Lightning wraps it in a distributed sampler under DDP (each rank its share)."""
        if self.sampler != "balanced" or not samples:
            return None
        counts = class_counts(samples, self.num_classes)
        weights = [1.0 / min((counts[label] for label in s.labels), default=len(samples)) for s in samples]
        return WeightedRandomSampler(weights, num_samples=len(samples), replacement=True)

    def _eval_sampler(self, dataset) -> Sampler | None:
        """Under DDP, val/test shards without repeats: Lightning's ``DistributedSampler`` pads
        the split with repeated samples to equal lengths, which skews the synced metrics.
        Ranks may then differ by one batch, which evaluation allows (no per-step collective)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1 or len(dataset) < trainer.world_size:
            return None  # Lightning's own sampler: every rank needs at least one sample
        return UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size,
                                            rank=trainer.global_rank, shuffle=False)
