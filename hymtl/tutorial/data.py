"""The tutorial's data: the ants/bees loaders as a view of :class:`~hymtl.data.ImageFolderDataModule`."""

from __future__ import annotations

import os
from typing import Any

from hydra.utils import instantiate
from torch.utils.data import DataLoader

from hymtl.backbones import Preprocessing, preprocessing_of
from hymtl.data import TORCHVISION_EXTENSIONS, ImageFolderDataModule, build_transforms
from hymtl.tutorial.configs import composed_config


class Hymenoptera:
    """The tutorial's ants/bees loaders: ``dataloaders``, ``dataset_sizes``, ``class_names``.

    A thin view of :class:`~hymtl.data.ImageFolderDataModule`: the folder is downloaded into
    ``root`` when missing (``download=True``; URL and SHA-256 manifest from
    ``conf/data/hymenoptera.yaml``) and every extracted file is checked. Transforms are the
    tutorial's: ``RandomResizedCrop(224)`` + horizontal flip for ``train``, ``Resize(256)`` +
    ``CenterCrop(224)`` for ``val``, ImageNet mean/std — or another backbone's recipe via
    ``preprocessing`` (a :class:`~hymtl.backbones.Preprocessing` or a backbone name, e.g.
    ``"efficientnet_lite0"``, whose pretrained weights expect mean = std = 0.5).

    Files follow torchvision ``ImageFolder``'s rules (``imagefolder_rules=True``), so the
    sizes are the tutorial's 244 / 153: the placeholder ``train/ants/imageNotFound.gif`` is not
    an ``ImageFolder`` image. ``imagefolder_rules=False`` reads it too (the DataModule's default).

    Attributes:
        dataloaders: ``{"train": shuffled loader, "val": loader}`` of ``(images, labels)``.
        image_datasets, dataset_sizes, data_transforms: per split, as in the tutorial.
        class_names: sorted folder names, ``['ants', 'bees']``.
        datamodule: the underlying ``ImageFolderDataModule``.
    """

    def __init__(
        self,
        root: str | os.PathLike = "data/hymenoptera_data",
        download: bool = True,
        batch_size: int = 4,
        num_workers: int | str = "auto",
        preprocessing: Preprocessing | str | None = None,
        imagefolder_rules: bool = True,
    ):
        if isinstance(preprocessing, str):
            preprocessing = preprocessing_of(preprocessing)
        self.preprocessing = preprocessing or Preprocessing()  # 224 / 256, ImageNet mean and std
        data = composed_config("data=hymenoptera").data  # URL, manifest, split, seed: conf/data/
        overrides: dict[str, Any] = {} if download else {"download_url": None}
        self.datamodule: ImageFolderDataModule = instantiate(data, _partial_=True)(
            root=str(root),
            batch_size=batch_size,
            num_workers=num_workers,
            preprocessing=self.preprocessing,
            # a notebook keeps these loaders for many calls: no idle worker processes in between
            persistent_workers=False,
            extensions=TORCHVISION_EXTENSIONS if imagefolder_rules else None,
            skipped_file=None,  # no run folder: skipped files are logged, not listed in a file
            features=None,  # no feature cache: the loaders serve images
            **overrides,
        )
        self.datamodule.prepare_data()
        self.datamodule.setup("fit")
        self.class_names: list[str] = self.datamodule.class_names
        self.data_transforms = {split: build_transforms(self.preprocessing, train=split == "train")
                                for split in ("train", "val")}
        self.dataloaders: dict[str, DataLoader] = {
            "train": self.datamodule.train_dataloader(),
            "val": self.datamodule.val_dataloader(),
        }
        self.image_datasets = {split: loader.dataset for split, loader in self.dataloaders.items()}
        self.dataset_sizes = {split: len(dataset) for split, dataset in self.image_datasets.items()}

    def __repr__(self) -> str:
        return f"Hymenoptera(root={str(self.datamodule.root)!r}, sizes={self.dataset_sizes}, classes={self.class_names})"
