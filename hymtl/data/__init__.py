"""Image data for training: one module per job.

* :mod:`~hymtl.data.samples` — a sample (a file or bytes, and its target), the label rules;
* :mod:`~hymtl.data.sources` — one module per shape of data (class folders, a label file,
  Parquet): description -> samples, class names, the splits the data names;
* :mod:`~hymtl.data.folders` — class-folder layouts (train/val[/test] or flat), scanning, class
  order, the hidden-file rule, the class-name rule;
* :mod:`~hymtl.data.splits` — the stratified split, k-fold, the split report;
* :mod:`~hymtl.data.images` — decoding (EXIF, transparency), transforms, the file check, the
  bad-file policy and ``skipped.txt``, the image dataset that drops a bad file;
* :mod:`~hymtl.data.loaders` — DataLoader plumbing (worker count, the skipping collate, workers);
* :mod:`~hymtl.data.download` — download, safe extraction, manifests, the download lock;
* :mod:`~hymtl.data.datamodule` — :class:`ImageFolderDataModule`, the LightningDataModule.
"""

from hymtl.data.datamodule import ImageFolderDataModule
from hymtl.data.download import MANIFEST_DIR, download_and_extract, verify_manifest
from hymtl.data.folders import (
    IMAGE_EXTENSIONS,
    TORCHVISION_EXTENSIONS,
    VAL_DIR_NAMES,
    SplitLayout,
    check_class_names,
    find_classes,
    is_image_file,
    is_visible,
    resolve_layout,
    scan_split,
    walk_images,
)
from hymtl.data.samples import Sample
from hymtl.data.splits import compare_splits, find_duplicates, kfold_split, stratified_split
from hymtl.data.images import (
    RUNTIME_SUFFIX,
    SKIPPED_FILE_NAME,
    BadFile,
    BadImageDropper,
    ImageSampleDataset,
    build_transforms,
    check_files,
    check_image_file,
    format_skipped,
    load_rgb,
    read_skipped,
    skipped_line,
    summarize_skipped,
)
from hymtl.data.loaders import SkippingDataLoader, collate_skipping, default_num_workers, worker_init

__all__ = [
    "BadFile", "BadImageDropper", "IMAGE_EXTENSIONS", "ImageFolderDataModule", "ImageSampleDataset", "MANIFEST_DIR",
    "RUNTIME_SUFFIX", "SKIPPED_FILE_NAME", "Sample", "SkippingDataLoader", "SplitLayout", "TORCHVISION_EXTENSIONS",
    "VAL_DIR_NAMES", "build_transforms", "check_class_names", "check_files", "check_image_file", "collate_skipping",
    "compare_splits", "default_num_workers", "download_and_extract", "find_classes", "find_duplicates",
    "format_skipped", "is_image_file", "kfold_split", "is_visible", "load_rgb", "read_skipped", "resolve_layout", "scan_split",
    "skipped_line", "stratified_split", "summarize_skipped", "verify_manifest", "walk_images", "worker_init",
]
