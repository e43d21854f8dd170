"""mixup and cutmix of training batches (``mode.mixup``, ``mode.cutmix``: the alpha of each).

:class:`BatchMixer` runs torchvision's v2 :class:`~torchvision.transforms.v2.MixUp` and
:class:`~torchvision.transforms.v2.CutMix` (one of them chosen at random per batch,
:class:`~torchvision.transforms.v2.RandomChoice`, when both are on: torchvision's classification
reference recipe) on the training batches only, after they reach the device
(``TransferModule.training_step``). Validation and test batches are never mixed.

What is mixed, per regime:

* **images** (``mode=finetune``, two_phase's unfrozen epochs, any ``mode.precompute_features=false``):
  mixup blends two images, cutmix pastes a box of one into the other — the papers' recipes.
* **cached activation maps** ``(N, C, H, W)`` of a frozen prefix (``mode=partial``): mixup blends
  the maps, cutmix pastes a box of the map (a box of the image, at the map's coarse resolution:
  7x7 cells for efficientnet_lite0's top stage). This is mixup/cutmix of *features* (the
  frozen stages' outputs, the "manifold mixup" of Verma et al. 2019), not of images: a mix of
  two activation maps is not the activation map of the mixed image.
* **cached pooled features** ``(N, F)`` (``mode=frozen``, two_phase's head epochs): mixup blends
  the feature vectors — feature mixup again; with the linear head it amounts to mixing the
  logits of the two images. A pooled vector has no image area to cut: cutmix stops with one
  line naming the alternative (``mode.precompute_features=false``: the images are cut) at the
  first training batch, never silently skipped (the features are cached by then: a rerun with
  ``mode.mixup`` instead reads them back).

Targets become vectors (:meth:`hymtl.tasks.Task.target_vectors`) mixed with the same weights:
multi-class one-hot vectors into class probabilities (PyTorch's cross-entropy takes them);
multi-label 0/1 vectors into per-label weights in [0, 1] for BCE — BCE is linear in its target,
so the loss of the mixed vector *is* the mix of the two images' losses, label by label (a label
both images have stays 1). Cross-entropy is linear in its target too: without class weights the
loss of a mixed batch equals ``lam * loss(labels) + (1 - lam) * loss(paired labels)``. With
``model.class_weights`` PyTorch averages a batch of probability targets over its images, not over
their weights as it does for class indices (the two agree on average for ``auto`` weights).

The training metrics (``train/acc``, F1, mAP) score each mixed input against the label of its
larger part (:meth:`hymtl.tasks.Task.hard_targets`: the argmax of the mixed target, as
torchvision's reference scripts do), so they stay what they were, measured on mixed inputs.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch

from hymtl.config import checked_number
from hymtl.errors import HymtlError

log = logging.getLogger(__name__)


class MixedBatch(NamedTuple):
    """A mixed training batch: what the module's training step gets instead of the loader's."""

    inputs: torch.Tensor  # mixed images (N, 3, H, W), or mixed cached features (N, F) / (N, C, H, W)
    targets: torch.Tensor  # (N, num_classes) mixed target vectors: what the loss is computed on
    cached: bool  # the inputs are cached backbone outputs (TransferModule(features=…)), not images
    labels: torch.Tensor  # the hard labels of each mix's larger part: what the training metrics see


class BatchMixer:
    """mixup (``mixup``: alpha of the Beta(alpha, alpha) mixing weight) and cutmix (``cutmix``:
    its alpha) of training batches; ``0`` turns one off. See the module docstring.

    Raises :class:`HymtlError` for an alpha that is not a number ``>= 0``."""

    def __init__(self, mixup: float = 0.0, cutmix: float = 0.0):
        self.mixup = checked_number("model.mixup", mixup, "number", 0)
        self.cutmix = checked_number("model.cutmix", cutmix, "number", 0)
        self._transforms: dict[bool, Any] = {}  # built on first use (never on the meta device of loading)
        self._said_features = False

    @property
    def active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def _transform(self, spatial: bool):
        """torchvision's MixUp, CutMix (``spatial`` inputs only) or a random choice of the two."""
        if spatial not in self._transforms:
            from torchvision.transforms import v2

            chosen = [v2.MixUp(alpha=self.mixup)] if self.mixup > 0 else []
            if self.cutmix > 0 and spatial:
                chosen.append(v2.CutMix(alpha=self.cutmix))
            self._transforms[spatial] = chosen[0] if len(chosen) == 1 else v2.RandomChoice(chosen)
        return self._transforms[spatial]

    def check_inputs(self, inputs: torch.Tensor, cached: bool) -> None:
        """Stop with one line when cutmix would meet inputs without an image area (pooled features)."""
        if self.cutmix > 0 and cached and inputs.dim() == 2:
            raise HymtlError(
                f"mode.cutmix={self.cutmix:g} cuts a box out of images or activation maps, but this regime trains on "
                f"cached pooled features {tuple(inputs.shape[1:])}, which have no image area: add "
                "mode.precompute_features=false to cut the images (slower: the backbone runs every epoch), "
                "or use mode.mixup instead")

    def __call__(self, inputs: torch.Tensor, labels: torch.Tensor, task, num_classes: int,
                 cached: bool = False) -> MixedBatch:
        """The batch ``(inputs, labels)`` mixed: inputs and target vectors with one weight per
        batch, each input paired with its neighbour in the (shuffled) batch (torchvision's rule)."""
        self.check_inputs(inputs, cached)
        if cached and not self._said_features:
            self._said_features = True
            log.info("mode.mixup/cutmix mix the cached %s of the frozen stages, not the images (feature mixup); "
                     "mode.precompute_features=false mixes the images", "pooled features" if inputs.dim() == 2
                     else "activation maps")
        vectors = task.target_vectors(labels, num_classes)
        flat = inputs.dim() == 2  # pooled (N, F): MixUp takes 4-D batches, and blends any shape alike
        mixed, targets = self._transform(spatial=not flat)(inputs[:, :, None, None] if flat else inputs, vectors)
        return MixedBatch(mixed[:, :, 0, 0] if flat else mixed, targets, cached, task.hard_targets(targets, labels))


def make_mixer(mixup: float = 0.0, cutmix: float = 0.0) -> BatchMixer | None:
    """The :class:`BatchMixer` of the settings (checked), or ``None`` when both are off."""
    mixer = BatchMixer(mixup, cutmix)
    return mixer if mixer.active else None
