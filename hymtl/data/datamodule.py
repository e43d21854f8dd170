"""Image folders as a LightningDataModule: the splits of :mod:`hymtl.data.folders`, the checked
files of :mod:`hymtl.data.images`, the loaders of :mod:`hymtl.data.loaders`, the download of
:mod:`hymtl.data.download`."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Sampler

from hymtl.backbones import Preprocessing, preprocessing_of
from hymtl.data.download import MANIFEST_DIR, download_and_extract, exclusive_lock
from hymtl.data.folders import (
    IMAGE_EXTENSIONS,
    Sample,
    SplitLayout,
    check_class_names,
    compare_splits,
    content_fingerprint,
    find_classes,
    fingerprint_differences,
    resolve_layout,
    scan_split,
    stratified_split,
)
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
from hymtl.errors import DataError, printable
from hymtl.fileio import atomic_write_text

log = logging.getLogger(__name__)


def _examples(entry: dict) -> str:
    """``a, b, c`` (``, …`` when the report holds more than its examples)."""
    more = ", …" if entry["count"] > len(entry["examples"]) else ""
    return ", ".join(entry["examples"]) + more


# --------------------------------------------------------------------------- the DataModule
class ImageFolderDataModule(LightningDataModule):
    """Train/val/test splits of an image folder (the layouts of :mod:`hymtl.data.folders`).

    Args:
        root: the folder. When missing and ``download_url`` is set, it is downloaded.
        batch_size: per-device batch size.
        num_workers: DataLoader workers; ``"auto"``: one per usable core (max 8).
        val_fraction, seed: the split of a flat ``<class>/`` folder.
        download_url, sha256, manifest: where to fetch ``root`` from and how to check it.
        backbone: the backbone's registry name: the images are prepared as it expects
            (:func:`hymtl.backbones.preprocessing_of`), unless ``preprocessing`` is given.
        preprocessing: a :class:`Preprocessing` (or its dict) to use instead.
        extensions: image file extensions to read (any case, dot optional); default
            ``IMAGE_EXTENSIONS``. ``TORCHVISION_EXTENSIONS`` follows ``ImageFolder`` exactly.
        strict: decode every file before training and stop with a :class:`DataError` at the
            first sign of a bad file or an unusable class folder (default: skip and report them).
        skipped_file: where to write the skipped files (``reason<TAB>path``); conf/ sets
            ``<run dir>/skipped.txt``.
        features: a :class:`hymtl.features.FeatureServer`: while it says so (the backbone is
            frozen), the train/val/test loaders give cached backbone features instead of images.
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
        root: str = "data/hymenoptera_data",
        batch_size: int = 32,
        num_workers: int | str = "auto",
        val_fraction: float = 0.2,
        seed: int = 0,
        download_url: str | None = None,
        sha256: str | None = None,
        manifest: str | None = None,
        preprocessing: Preprocessing | dict | None = None,
        backbone: str | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        extensions: Sequence[str] | None = None,
        strict: bool = False,
        skipped_file: str | os.PathLike | None = None,
        features=None,
        augment: AugmentRecipe | None = None,
    ):
        super().__init__()
        if int(batch_size) < 1:
            raise DataError(f"data.batch_size must be a positive integer, got {batch_size}")
        self.root = Path(os.path.expanduser(str(root)))
        self.batch_size = int(batch_size)
        self.num_workers = default_num_workers() if num_workers == "auto" else int(num_workers)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.download_url = download_url
        self.sha256 = sha256
        self.manifest = (MANIFEST_DIR / manifest if manifest and not os.path.isabs(manifest) else manifest)
        if isinstance(preprocessing, dict):
            preprocessing = Preprocessing.from_dict(preprocessing)
        self.preprocessing = preprocessing if preprocessing is not None or not backbone else preprocessing_of(backbone)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers
        self.extensions = frozenset("." + e.lower().lstrip(".") for e in extensions) if extensions else IMAGE_EXTENSIONS
        self.strict = bool(strict)
        self.skipped_file = skipped_file
        self.features = features
        self.augment = augment
        self.skipped: list[BadFile] = []  # left out by the up-front check (runtime failures: skipped.txt)
        self._content: dict[str, dict] | None = None  # content_fingerprint, once scanned
        self.split_report: dict = {}  # what does not match between the splits: see _report_splits
        self._class_names: list[str] | None = None
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.test_samples: list[Sample] = []

    # -- discovery -----------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Download the folder when it is missing and a URL is known (rank 0 only, by Lightning)."""
        if self.root.is_dir():
            return
        if not self.download_url:
            raise DataError(f"data folder not found: {printable(self.root)}")
        # torchrun starts every rank at once, each calling this before the Trainer exists: the
        # first to take the lock downloads, the others wait and then find the folder in place
        with exclusive_lock(self.root.parent / f".{self.root.name}.lock"):
            if self.root.is_dir():
                return
            download_and_extract(self.download_url, self.root, sha256=self.sha256,
                                 manifest=Path(self.manifest) if self.manifest else None)

    @property
    def layout(self) -> SplitLayout:
        return resolve_layout(self.root)

    @property
    def class_names(self) -> list[str]:
        """Sorted class-folder names of the training split that hold at least one usable image."""
        if self._class_names is None:
            self._discover()
        return self._class_names

    def _discover(self) -> None:
        """Scan every split, check every file (see :func:`check_image_file`), drop class folders
        without a usable training image, split a flat folder; record and report what was left out."""
        layout = self.layout
        source = layout.train if layout.train is not None else self.root
        names = find_classes(source)
        names = [n for n in names if layout.train is not None or n.lower() not in ("test",)]
        if len(names) < 2:
            raise DataError(f"need at least two class folders in {printable(source)}, found {names}")
        check_class_names(source, names)
        ext = self.extensions
        train = scan_split(source, names, ext)
        val = scan_split(layout.val, names, ext) if layout.val is not None else None
        test = scan_split(layout.test, names, ext) if layout.test is not None else None
        every = train + (val or []) + (test or [])
        reasons = check_files([s.path for s in every], decode=self.strict)
        bad = [BadFile(s.path, reasons[s.path]) for s in every if s.path in reasons]
        counts = [0] * len(names)
        for s in train:
            counts[s.label] += s.path not in reasons
        empty = [name for name, n in zip(names, counts) if n == 0]
        bad += [BadFile(str(Path(source) / name), "class folder without a usable image: class ignored")
                for name in empty]
        self.skipped = bad
        self._write_skipped(bad, len(every))
        if bad:
            first = bad[0]
            if self.strict:
                raise DataError(f"data.strict=true: {printable(summarize_skipped(bad))} in {printable(self.root)}; "
                                f"first: {printable(first.path)} ({printable(first.reason)})" + self._see_skipped())
            log.warning("%s of %d in %s%s", printable(summarize_skipped(bad)), len(every), printable(self.root),
                        self._see_skipped())
            for b in bad[:20]:
                log.warning("  skipped %s: %s", printable(b.path), printable(b.reason))
            if len(bad) > 20:
                log.warning("  ... and %d more", len(bad) - 20)
        usable = [name for name, n in zip(names, counts) if n > 0]
        if len(usable) < 2:
            found = f"only {usable}" if usable else "none"
            raise DataError(f"need at least two classes with usable images in {printable(source)}, found {found} "
                            f"({printable(summarize_skipped(bad))})" + self._see_skipped())
        relabel = {names.index(name): i for i, name in enumerate(usable)}

        def keep(samples: list[Sample]) -> list[Sample]:
            return [Sample(s.path, relabel[s.label]) for s in samples if s.path not in reasons and s.label in relabel]

        train, val, test = keep(train), keep(val) if val is not None else None, keep(test) if test is not None else None
        if val is None:
            train, val = stratified_split(train, self.val_fraction, self.seed)
        self._class_names = usable
        self.train_samples, self.val_samples = train, val
        self.test_samples = test if test is not None else list(val)
        if test is None:
            log.info("no test/ folder in %s: the val split doubles as the test split", printable(self.root))
        self._report_splits(layout)

    def _report_splits(self, layout: SplitLayout) -> None:
        """Fill :attr:`split_report` (:func:`hymtl.data.folders.compare_splits`) and say each
        mismatch in one warning line: evaluation class folders unknown to train (their images are
        left out), classes of the run without an image in an evaluation split (macro averages
        score such a class 0 whenever the model predicts it), files of val/test byte-identical to
        training files (evaluation on seen images)."""
        evaluation = {"val": self.val_samples}
        folders = {"val": layout.val}
        if layout.test is not None:
            evaluation["test"], folders["test"] = self.test_samples, layout.test
        report = compare_splits(self.train_samples, evaluation, self._class_names, folders, self.root, self.extensions)
        self.split_report = report
        for split in evaluation:
            unknown = report[f"unknown_{split}_classes"]
            if unknown["count"]:
                log.warning("%s: %d class folder%s unknown to train left out (%d images): %s", split, unknown["count"],
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

    def _see_skipped(self) -> str:
        return f"; list in {printable(self.skipped_file)}" if self.skipped_file else ""

    def _write_skipped(self, bad: Sequence[BadFile], checked: int) -> None:
        if not self.skipped_file:
            return
        trainer = getattr(self, "trainer", None)
        if trainer is not None and not trainer.is_global_zero:
            return
        header = (f"files left out of the run: reason<TAB>path ({len(bad)} of {checked} checked in "
                  f"{printable(self.root)})\n"
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
        for split, samples in (("train", self.train_samples), ("val", self.val_samples)):
            if not samples:
                raise DataError(f"no images in the {split} split of {printable(self.root)}")

    # -- resume --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the content fingerprint of the splits (file counts and a
        SHA-256 of names, sizes and labels: :func:`~hymtl.data.folders.content_fingerprint`)."""
        return {"content": self.content_fingerprint()} if self._class_names is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume (Lightning restores this from the checkpoint after the scan): refuse, with
        one line, images other than those the checkpoint was trained and scored on — the same
        ``data.root`` with files added, removed, renamed or resized is other data."""
        saved = state_dict.get("content")
        if not saved:  # a checkpoint of an older hymtl
            return
        differences = fingerprint_differences(saved, self.content_fingerprint())
        if differences:
            raise DataError(f"cannot resume: the images of {printable(self.root)} are not the ones this checkpoint "
                            f"was trained and scored on ({'; '.join(differences)}); start a new run for new data")

    def content_fingerprint(self) -> dict[str, dict]:
        """:func:`~hymtl.data.folders.content_fingerprint` of the train, val and (a real) test split,
        computed once per run (one ``stat`` per file)."""
        if self._content is None:
            test = self.test_samples if self.layout.test is not None else None
            self._content = content_fingerprint(
                self.root, {"train": self.train_samples, "val": self.val_samples, "test": test})
        return self._content

    @property
    def test_split_name(self) -> str:
        """``"test"`` when the folder has one, else ``"val"`` (val doubles as test)."""
        return self.layout.test_source

    # -- loaders -------------------------------------------------------------------------
    def _loader(self, samples: Sequence[Sample], train: bool) -> DataLoader:
        # big JPEGs: reduced-scale decoding
        dataset = ImageSampleDataset(samples, build_transforms(self.preprocessing, train=train, augment=self.augment),
                                     skip_bad=True,
                                     failure_log=self.skipped_file, decode_size=self.preprocessing.resize_size)
        sampler = None if train else self._eval_sampler(dataset)
        # persistent workers would make exact resume impossible: their random streams (the
        # augmentations) would run on from epoch 0 in an uninterrupted run but start afresh at
        # the resumed epoch, and the iterator made at resume draws one more seed from the global
        # RNG (the shuffling then differs too); see persistent_workers in the class docstring
        return SkippingDataLoader(
            dataset,
            batch_size=self.batch_size,
            collate_fn=collate_skipping,
            worker_init_fn=worker_init,
            shuffle=train,
            sampler=sampler,
            drop_last=False,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            pin_memory=self.pin_memory,
        )

    def _feature_loader(self, samples: Sequence[Sample], train: bool, stage: str = "fit") -> DataLoader:
        dataset = self.features.dataset(self, samples, train, stage)
        # tensors already in memory: worker processes would only add start-up time
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=train, num_workers=0,
                          sampler=None if train else self._eval_sampler(dataset))

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
                                     decode_size=self.preprocessing.resize_size)
        images = [item[0] if item is not None else torch.zeros(3, size, size) for item in dataset]
        return torch.stack(images) if images else torch.zeros(0, 3, size, size)

    def _eval_sampler(self, dataset) -> Sampler | None:
        """Under DDP, val/test shards without repeats: Lightning's ``DistributedSampler`` pads
        the split with repeated samples to equal lengths, which skews the synced metrics.
        Ranks may then differ by one batch, which evaluation allows (no per-step collective)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.world_size <= 1 or len(dataset) < trainer.world_size:
            return None  # Lightning's own sampler: every rank needs at least one sample
        return UnrepeatedDistributedSampler(dataset, num_replicas=trainer.world_size,
                                            rank=trainer.global_rank, shuffle=False)
