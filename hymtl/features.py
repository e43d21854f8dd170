"""Run a frozen backbone (or its frozen prefix) once; the on-disk feature cache.

A frozen backbone in eval mode is a fixed function of the image, so the head can train on
its outputs instead of re-running it every epoch. The same holds for the frozen prefix of a
partially fine-tuned backbone (the stages below the ones that train): the top stages can
train on its activations (:class:`BackbonePrefix`). :class:`FeatureExtractor` computes, for
each image of a :class:`ViewSource`, the outputs of its plain (eval-transform) view and of
``K`` augmented views, and keeps them in a persistent cache:

``<cache dir>/features/<fingerprint>/<kk>/<key>.pt``

* ``fingerprint`` (one folder per extractor setting): cache format, backbone name, the prefix
  (how many of its stages; all: the pooled features), a SHA-256 of every tensor of the
  prefix's state dict (weights *and* BatchNorm statistics), the stored dtype, the
  source's ``recipe`` (the exact eval and train transforms and the augmentation seed), the
  autocast dtype and the memory format. Any change selects a new folder.
* ``key`` (one file per image): SHA-256 of the file's absolute path, size and ``mtime_ns``:
  an edited or replaced image misses the cache; ``kk`` is its first two hex digits.
* Each file holds ``{"identity": [path, size, mtime_ns], "file_sha256": ..., "plain": (*S),
  "aug": (k, *S), "sha256": ...}``: ``S = (F,)`` for pooled features (float32), ``(C, H, W)``
  for the activations of a prefix (bfloat16: half the bytes, and the top stages train in
  bf16 autocast on a CPU or GPU that has it). An entry is *verified* on every read: its identity, the
  SHA-256 of the image file's bytes (an image rewritten with the same size and mtime is
  caught; hashing the whole file costs one read of a few hundred KiB, far less than the
  decode it saves, and a partial hash would miss an edit in the middle), the SHA-256 of the
  stored tensors' bytes (flipped bits), their shapes, and that every view is finite.
  Augmented view ``i`` of an image is drawn with a seed derived from (seed, path, i), so it
  is the same tensor whatever ``K`` is: an entry with ``k >= K`` views serves ``K``.
* Files are written atomically (:func:`hymtl.fileio.atomic_write_bytes`) and read with
  ``torch.load(weights_only=True)``; an unreadable or inconsistent entry is logged and
  recomputed, never an error.

Cache location: the ``cache_dir`` argument (``feature_cache.dir`` in the config), else
``$HYMTL_CACHE_DIR``, else ``$XDG_CACHE_HOME/hymtl`` (``~/.cache/hymtl``). ``cache_dir=False``
(``feature_cache.enabled=false``) computes in memory and writes nothing.

Serving (:class:`FeatureServer`, ``feature_cache:`` in conf/): the datamodule is given the
server and asks it, for every loader, whether that stage gets features instead of images; the
server asks the LightningModule (``backbone_trains_at(epoch)``): features while the backbone
is frozen, images from the epoch it trains (the Trainer then reloads the dataloaders:
:meth:`FeatureServer.trainer_kwargs`). Feature batches are :class:`FeatureBatch` tuples, so the
module knows it is given features, not images.

Sharding (DDP): each rank runs the backbone over its own share of a split,
``range(rank, len(source), world_size)`` (reading and filling the cache entries of those
images only, on its own device), then one ``all_gather_object`` of the shares' ``(indices,
features)`` gives every rank the whole split. Each image is computed once, by one rank; the
cache is not read back, so the same protocol works with the cache disabled.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import time
from pathlib import Path
from typing import Iterable, NamedTuple, Protocol, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from hymtl.data.folders import Sample
from hymtl.data.images import BadImageDropper, build_transforms
from hymtl.data.loaders import SkippingDataLoader, collate_skipping
from hymtl.errors import HymtlError, printable
from hymtl.fileio import atomic_write_bytes
from hymtl.progress import Progress

log = logging.getLogger(__name__)

CACHE_FORMAT = 3  # bump when the entry layout changes: old folders are then never read


class ViewSource(Protocol):
    """What :class:`FeatureExtractor` needs from a dataset (:class:`MultiViewDataset`).

    ``source[i]`` is a ``(1 + num_views, 3, H, W)`` tensor: view 0 the plain eval view, then
    the augmented views, each drawn reproducibly from (seed, path, view index).
    """

    recipe: str  # the transforms and seed that define the views: part of the cache fingerprint
    num_views: int  # augmented views per image (K)

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> torch.Tensor: ...

    def identity(self, index: int) -> tuple[str, int, int]:
        """``(absolute path, size in bytes, mtime_ns)`` of the image file."""
        ...


class Features(NamedTuple):
    """What :meth:`FeatureExtractor.extract` returns: ``tensor[j]`` belongs to item ``indices[j]``
    (items whose file failed to decode are left out)."""

    indices: list[int]
    tensor: torch.Tensor  # (len(indices), 1 + num_views, *S): pooled (F,) or activations (C, H, W)


def default_cache_dir() -> Path:
    """``$HYMTL_CACHE_DIR``, else ``$XDG_CACHE_HOME/hymtl``, else ``~/.cache/hymtl``."""
    if os.environ.get("HYMTL_CACHE_DIR"):
        return Path(os.path.expanduser(os.environ["HYMTL_CACHE_DIR"]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hymtl"


def file_identity(path: str | os.PathLike) -> tuple[str, int, int]:
    """``(absolute path, size, mtime_ns)``: what makes a cached entry belong to a file."""
    st = os.stat(path)
    return os.path.abspath(path), int(st.st_size), int(st.st_mtime_ns)


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes: ties a cache entry to the image content, not just its stat."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tensor_checksum(*tensors: torch.Tensor) -> str:
    """SHA-256 over the raw bytes of ``tensors`` (with their shapes): detects flipped bytes."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        digest.update(repr((tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def state_digest(module: nn.Module) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of every state-dict tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def view_seed(seed: int, path: str, view: int) -> int:
    """The RNG seed of augmented view ``view`` of ``path``: independent of K and of the order."""
    return int.from_bytes(hashlib.sha256(f"{seed}|{path}|{view}".encode("utf-8", "surrogateescape")).digest()[:8], "little") & (2**63 - 1)


class BackbonePrefix(nn.Module):
    """Images -> the output of the first ``stages`` stages of a split backbone
    (:meth:`hymtl.backbones.Backbone.run_stages`). Only the prefix's modules are registered, so
    its state dict (the cache fingerprint), ``eval()`` and ``to()`` cover those stages alone:
    the cache of a partially fine-tuned run does not change when its top stages train."""

    def __init__(self, backbone, stages: int):
        super().__init__()
        self.stages = int(stages)
        self.parts = nn.ModuleList(m for stage in backbone.stages[: self.stages] for m in stage.modules(backbone.model))
        object.__setattr__(self, "_backbone", backbone)  # not a submodule: its top stages stay out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._backbone.run_stages(images, 0, self.stages)


class FeatureExtractor:
    """Runs ``backbone`` (eval mode, ``inference_mode``) over view sources, with the disk cache.

    Args:
        backbone: maps ``(N, 3, H, W)`` to ``(N, F)`` (``TransferModule.backbone``), or to the
            activations of a prefix (:class:`BackbonePrefix`).
        name: the backbone's registry name (part of the fingerprint).
        prefix: which part of the backbone ``backbone`` is, e.g. ``"all"`` or ``"7/9"`` stages
            (part of the fingerprint).
        store_dtype: the dtype outputs are kept and stored in (float32 for pooled features,
            bfloat16 for activations).
        cache_dir: the cache root; ``None``: :func:`default_cache_dir`; ``False``: no disk cache.
        device: where to run the backbone.
        batch_size, num_workers: the extraction DataLoader (decoding runs in the workers).
        autocast_dtype: e.g. ``torch.bfloat16``; ``None`` runs in the backbone's dtype.
        channels_last: run in channels-last memory format (faster convolutions on CPU and GPU).
    """

    def __init__(
        self,
        backbone: nn.Module,
        name: str,
        cache_dir: str | os.PathLike | None | bool = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        num_workers: int = 0,
        autocast_dtype: torch.dtype | None = None,
        channels_last: bool = True,
        prefix: str = "all",
        store_dtype: torch.dtype = torch.float32,
    ):
        self.backbone = backbone
        self.name = name
        self.prefix = str(prefix)
        self.store_dtype = store_dtype
        if cache_dir is False:
            self.cache_root: Path | None = None
        else:
            self.cache_root = Path(os.path.expanduser(str(cache_dir))) if cache_dir not in (None, True, "") else default_cache_dir()
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        self._weights_digest: str | None = None
        self.stats = {"hits": 0, "computed": 0, "corrupt": 0, "seconds": 0.0}

    # ------------------------------------------------------------------ cache layout
    @property
    def weights_digest(self) -> str:
        if self._weights_digest is None:
            self._weights_digest = state_digest(self.backbone)
        return self._weights_digest

    def fingerprint(self, recipe: str) -> str:
        """The cache folder name of this extractor applied to views made by ``recipe``."""
        parts = [
            f"format={CACHE_FORMAT}",
            f"backbone={self.name}",
            f"prefix={self.prefix}",
            f"weights={self.weights_digest}",
            f"dtype={self.store_dtype}",
            f"recipe={recipe}",
            f"autocast={self.autocast_dtype}",
            f"channels_last={self.channels_last}",
        ]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]

    def entry_path(self, recipe: str, identity: tuple[str, int, int]) -> Path | None:
        """Where the entry of one image file lives (``None`` without a disk cache)."""
        if self.cache_root is None:
            return None
        key = hashlib.sha256(repr(tuple(identity)).encode()).hexdigest()
        return self.cache_root / "features" / self.fingerprint(recipe) / key[:2] / f"{key}.pt"

    def _read(self, path: Path, identity: tuple[str, int, int], num_views: int) -> torch.Tensor | None:
        """The ``(1 + num_views, *S)`` outputs of an entry, or ``None`` (missing, corrupt, too few views)."""
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            plain, aug = entry["plain"], entry["aug"]
            if tuple(entry["identity"]) != tuple(identity):
                raise ValueError("identity mismatch")
            if plain.dim() < 1 or aug.dim() != plain.dim() + 1 or aug.shape[1:] != plain.shape:
                raise ValueError("bad shapes")
            if plain.dtype != self.store_dtype or aug.dtype != self.store_dtype:
                raise ValueError(f"dtype {plain.dtype}, expected {self.store_dtype}")
            if entry["sha256"] != tensor_checksum(plain, aug):
                raise ValueError("checksum mismatch")
            if not (torch.isfinite(plain).all() and torch.isfinite(aug).all()):
                raise ValueError("non-finite values")
            if entry["file_sha256"] != file_digest(identity[0]):
                raise ValueError("image file content changed")
        except Exception as exc:  # truncated, garbage, wrong structure: recompute, never crash
            log.warning("feature cache entry %s is unreadable (%s: %s); recomputing", path, type(exc).__name__, exc)
            self.stats["corrupt"] += 1
            return None
        if aug.shape[0] < num_views:
            return None
        return torch.cat([plain[None], aug[:num_views]])

    def _write(self, path: Path, identity: tuple[str, int, int], views: torch.Tensor) -> None:
        buffer = io.BytesIO()
        plain, aug = views[0].clone(), views[1:].clone()
        if not torch.isfinite(views).all():  # never store poison: it would be re-served every run
            log.warning("non-finite features for %s; not cached", printable(identity[0]))
            return
        try:
            file_sha256 = file_digest(identity[0])
        except OSError as exc:
            log.warning("cannot hash %s for the feature cache: %s", printable(identity[0]), printable(exc))
            return
        torch.save({"identity": list(identity), "file_sha256": file_sha256, "plain": plain, "aug": aug,
                    "sha256": tensor_checksum(plain, aug)}, buffer)
        try:
            atomic_write_bytes(path, buffer.getvalue())
        except OSError as exc:  # a read-only or full cache disk slows runs down, it does not stop them
            log.warning("cannot write feature cache entry %s: %s", path, exc)

    # ------------------------------------------------------------------ extraction
    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone outputs of a batch, on the CPU in ``store_dtype``."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None) if dtype else contextlib.nullcontext():
            out = self.backbone(images)
        return out.to(self.store_dtype).cpu()

    @contextlib.contextmanager
    def _eval_mode(self):
        # each submodule gets its own mode back: a prefix's parts stay in eval, whatever its wrapper says
        modes = [(module, module.training) for module in self.backbone.modules()]
        self.backbone.eval()
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.backbone.to(self.device)
        try:
            yield
        finally:
            for module, training in modes:
                module.training = training

    def extract(self, source: ViewSource, indices: Iterable[int] | None = None) -> Features:
        """Outputs ``(n, 1 + source.num_views, *S)`` of the items ``indices`` of ``source`` (default: all).

        Cached entries are read; the others are computed in batches (decoding in
        ``num_workers`` DataLoader workers) and stored. ``indices`` selects a shard. Progress:
        a bar on a terminal (images, images/s, time left, cache hits), and one summary line in
        the log at the end (count, duration, cache hits, computed): :class:`hymtl.progress.Progress`.
        """
        started = time.perf_counter()
        indices = list(range(len(source))) if indices is None else list(indices)
        views = 1 + source.num_views
        results: dict[int, torch.Tensor] = {}
        missing: list[int] = []
        with Progress("feature extraction", total=len(indices), unit="images", log=log) as progress:
            for i in indices:
                path = self.entry_path(source.recipe, source.identity(i))
                cached = self._read(path, source.identity(i), source.num_views) if path is not None else None
                if cached is None:
                    missing.append(i)
                else:
                    results[i] = cached
                    progress.update(1, cache_hits=len(results), computed=0)
            self.stats["hits"] += len(results)
            if missing:
                self._compute(source, missing, views, results, progress)
            failed = len(indices) - len(results)
            progress.update(0, cache_hits=len(indices) - len(missing), computed=len(missing) - failed,
                            **({"failed": failed} if failed else {}))
        self.stats["seconds"] += time.perf_counter() - started
        kept = [i for i in indices if i in results]
        if len(kept) < len(indices):
            log.warning("%d of %d images failed to decode and have no features", len(indices) - len(kept), len(indices))
        tensor = torch.stack([results[i] for i in kept]) if kept else torch.empty(0, views, 0, dtype=self.store_dtype)
        return Features(kept, tensor)

    def _compute(self, source: ViewSource, missing: Sequence[int], views: int, results: dict,
                 progress: Progress) -> None:
        # every item is (V, 3, H, W): batch whole images so a batch holds ~batch_size views
        per_batch = max(1, self.batch_size // views)
        loader = SkippingDataLoader(
            _Indexed(Subset(source, missing)), batch_size=per_batch, shuffle=False, collate_fn=collate_skipping,
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
            # its own generator: creating the iterator draws a seed, and drawing it from the global
            # RNG would make a run that extracts differ from one that reads the cache
            generator=torch.Generator(),
        )
        hits, done = len(results), 0
        with self._eval_mode():
            for positions, batch in loader:  # items that failed to decode are dropped (None)
                n, v = batch.shape[:2]
                feats = self.forward(batch.flatten(0, 1))
                feats = feats.reshape(n, v, *feats.shape[1:])
                for pos, item in zip(positions.tolist(), feats):
                    index = missing[pos]
                    results[index] = item
                    path = self.entry_path(source.recipe, source.identity(index))
                    if path is not None:
                        self._write(path, source.identity(index), item)
                # the positions of a batch are increasing: up to its last, every item is done (or dropped)
                progress.update(int(positions[-1]) + 1 - done, cache_hits=hits, computed=len(results) - hits)
                done = int(positions[-1]) + 1
        progress.update(len(missing) - done)  # a last batch whose every file failed to decode
        self.stats["computed"] += sum(i in results for i in missing)


class _Indexed(Dataset):
    """``(position, item)`` pairs, so a batch knows which samples it holds (``None`` for an item
    that failed to decode: :func:`~hymtl.data.loaders.collate_skipping` drops it)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int):
        item = self.dataset[position]
        return None if item is None else (position, item)


# --------------------------------------------------------------------------- the datasets
class MultiViewDataset(Dataset):
    """Each image decoded once, as a ``(1 + num_views, 3, H, W)`` tensor: the eval view, then
    ``num_views`` training-augmented views; view ``i`` is drawn with the seed
    :func:`view_seed` ``(seed, path, i)``, so it is the same tensor in every run and worker.
    The :class:`ViewSource` of the feature cache. A file that fails to decode or to transform
    gives ``None`` (the extractor leaves it out), by the rule of the image loaders
    (:class:`hymtl.data.images.BadImageDropper`: logged, appended to ``failure_log``).
    """

    def __init__(self, samples: Sequence[Sample], preprocessing, num_views: int = 0, seed: int = 0,
                 failure_log: str | os.PathLike | None = None):
        self.samples = list(samples)
        self.num_views = int(num_views)
        self.seed = int(seed)
        self.decode_size = preprocessing.resize_size
        self.eval_transform = build_transforms(preprocessing, train=False)
        self.train_transform = build_transforms(preprocessing, train=True)
        self.dropper = BadImageDropper(self.decode_size, failure_log)
        # everything that shapes the pixels of a view: the cache fingerprint of these views
        self.recipe = (f"eval={self.eval_transform!r}\ntrain={self.train_transform!r}\n"
                       f"seed={self.seed}\ndecode_size={self.decode_size}")

    def __len__(self) -> int:
        return len(self.samples)

    def identity(self, index: int) -> tuple[str, int, int]:
        return file_identity(self.samples[index].path)

    def __getitem__(self, index: int) -> torch.Tensor | None:
        path = self.samples[index].path
        return self.dropper(path, lambda image: self._views(image, os.path.abspath(path)))

    def _views(self, image, path: str) -> torch.Tensor:
        views = [self.eval_transform(image)]
        for view in range(1, self.num_views + 1):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(view_seed(self.seed, path, view))
                views.append(self.train_transform(image))
        return torch.stack(views)


class FeatureBatch(NamedTuple):
    """A batch (or one item) of cached backbone outputs, not of images: what the module's steps
    give the head, or the top stages, directly (``TransferModule(features=…)``). ``index`` names each row's image:
    its position in the split the loader serves (the test figures decode those few images)."""

    features: torch.Tensor  # (N, F) pooled features, or (N, C, H, W) activations of a frozen prefix
    index: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,): last, like the labels of an image batch


class FeatureTensorDataset(Dataset):
    """:class:`FeatureBatch` items from cached backbone outputs ``(N, V, *S)``.

    ``random_view``: each access returns one of the image's V cached views (plain + augmented)
    at random, the cached stand-in for on-the-fly augmentation; otherwise view 0 (plain).
    ``index``: the position of each row's image in its split (default ``0..N-1``).
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, random_view: bool = False,
                 index: torch.Tensor | None = None):
        if features.dim() < 3 or features.shape[0] != labels.shape[0]:
            raise ValueError(f"features (N, V, *S) and labels (N,) expected, got {tuple(features.shape)}, {tuple(labels.shape)}")
        self.features, self.labels, self.random_view = features, labels, random_view
        self.index = torch.arange(features.shape[0]) if index is None else torch.as_tensor(index, dtype=torch.long)

    def __len__(self) -> int:
        return self.features.shape[0]

    def __getitem__(self, index: int) -> FeatureBatch:
        view = int(torch.randint(self.features.shape[1], ())) if self.random_view else 0
        return FeatureBatch(self.features[index, view], self.index[index], self.labels[index])


# --------------------------------------------------------------------------- serving
def autocast_dtype(precision: str | None) -> torch.dtype | None:
    """The autocast dtype of a Lightning precision (``"bf16-mixed"`` -> bfloat16, ``"16-mixed"``
    -> float16, otherwise ``None``): features computed with the numerics of the uncached path."""
    precision = str(precision or "32-true")
    if precision.startswith("bf16"):
        return torch.bfloat16
    return torch.float16 if precision.startswith("16") else None


def epoch_to_run(trainer) -> int:
    """The training epoch the fit loop runs next (or is running): ``trainer.current_epoch``, except
    while a resumed fit builds its first loaders. Lightning requests them (the sanity check's
    val loader, then the train loader) before it updates ``current_epoch`` from the checkpoint's
    progress, so it still names the epoch *before* the resumed one; the loop's count of processed
    epochs already names the right one (it is what ``current_epoch`` becomes)."""
    progress = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_progress", None), "current", None)
    processed = getattr(progress, "processed", None)
    return max(int(trainer.current_epoch), int(processed)) if isinstance(processed, int) else int(trainer.current_epoch)


class FeatureServer:
    """Serves the outputs of a frozen backbone, or of a frozen prefix of it, computed once
    (:class:`FeatureExtractor`, with the disk cache) instead of images: ``mode=frozen`` for the
    whole run and its test, ``two_phase`` for its head-only epochs, partial fine-tuning
    (``mode=partial``) the activations below its trainable stages for every epoch and the test.
    Built from ``feature_cache:`` in conf/ and given to the datamodule
    (``ImageFolderDataModule(features=…)``), which asks it per loader.

    What it serves is decided by the module being trained, found as ``trainer.lightning_module``
    and never read from the config: ``module.cached_stages_at(epoch)`` names how many leading
    stages are fixed at the epoch to run (``fit``) or for good (``test``: ``epoch=None``), and
    ``module.cached_prefix(stages)`` the network that computes their output; ``0`` means images.
    The device (``trainer.strategy.root_device``) and the autocast dtype (``trainer.precision``)
    come from the Trainer, the memory format from ``hparams.channels_last``.

    Args:
        precompute: serve features at all (``mode.precompute_features``); ``False``: images always.
        views: augmented views cached per training image, beside the plain view (``mode.feature_views``).
        enabled: the disk cache; ``False`` computes in memory and writes nothing.
        dir: the cache root; ``None``: :func:`default_cache_dir`.
        batch_size: images per extraction forward pass.
    """

    def __init__(self, precompute: bool = False, views: int = 0, enabled: bool = True,
                 dir: str | os.PathLike | None = None, batch_size: int = 64):
        if int(views) < 0:
            raise HymtlError(f"feature views must be >= 0, got {views}")
        if int(batch_size) < 1:
            raise HymtlError(f"feature_cache.batch_size must be a positive integer, got {batch_size}")
        self.precompute = bool(precompute)
        self.views = int(views)
        self.cache_dir: str | os.PathLike | None | bool = (dir or None) if enabled else False
        self.batch_size = int(batch_size)
        self.extractor: FeatureExtractor | None = None  # the last one used (built per module and prefix)
        self._extractors: dict[int, FeatureExtractor] = {}
        self._module = None
        self._datasets: dict = {}

    def trainer_kwargs(self, unfreeze_at_epoch: int | None) -> dict:
        """Extra Trainer arguments: a two-phase run needs new dataloaders (images) at the switch.

        Every epoch, not every ``unfreeze_at_epoch`` epochs: Lightning counts that period from the
        epoch it last built the loaders, which after a resume is the resumed epoch, so a run
        resumed in its head-only phase would miss the switch (features served to a training
        backbone) and reload at other epochs than an uninterrupted run (other worker seeds).
        Rebuilding a loader costs little: the features stay in memory (:meth:`dataset`)."""
        return {"reload_dataloaders_every_n_epochs": 1} if self.precompute and unfreeze_at_epoch else {}

    def cached_stages(self, trainer, stage: str) -> int:
        """How many leading backbone stages the ``stage`` ("fit", "test", "predict") loaders serve
        the output of right now; ``0``: images."""
        if not self.precompute or trainer is None or stage not in ("fit", "test"):
            return 0
        module = getattr(trainer, "lightning_module", None)
        if not callable(getattr(module, "cached_stages_at", None)):
            return 0  # a module without a backbone schedule is always given images
        return int(module.cached_stages_at(None if stage == "test" else epoch_to_run(trainer)))

    def serves(self, trainer, stage: str) -> bool:
        """Whether the ``stage`` ("fit", "test", "predict") loaders give cached outputs right now."""
        return self.cached_stages(trainer, stage) > 0

    def _extractor(self, datamodule, module, stages: int) -> FeatureExtractor:
        """The extractor of ``module``'s first ``stages`` stages (one per module and prefix)."""
        if module is not self._module:  # another module: other weights, other features
            self._module, self._datasets, self._extractors = module, {}, {}
        if stages not in self._extractors:
            trainer = datamodule.trainer
            network = module.cached_prefix(stages)
            whole = stages >= len(module.backbone_stages)
            self._extractors[stages] = FeatureExtractor(
                network,
                name=module.hparams.backbone,
                cache_dir=self.cache_dir,
                device=trainer.strategy.root_device,
                batch_size=self.batch_size,
                num_workers=datamodule.num_workers,
                autocast_dtype=autocast_dtype(trainer.precision),
                channels_last=bool(module.hparams.channels_last),
                prefix="all" if whole else f"{stages}/{len(module.backbone_stages)}",
                store_dtype=torch.float32 if whole else torch.bfloat16,
            )
            where = self._extractors[stages].cache_root or "in memory: feature_cache.enabled=false"
            if whole:
                log.info("head-only epochs train on cached backbone features (%s)", where)
            else:
                names = [stage.name for stage in module.backbone_stages]
                log.info("the top stages (%s) train on cached activations of the frozen stages %s…%s (%s)",
                         ", ".join(names[stages:]), names[0], names[stages - 1], where)
        self.extractor = self._extractors[stages]
        return self.extractor

    def dataset(self, datamodule, samples: Sequence[Sample], train: bool,
                stage: str = "fit") -> FeatureTensorDataset:
        """The cached outputs of ``samples`` (a split of ``datamodule``: its ``trainer``,
        ``preprocessing``, ``seed``, ``num_workers`` and ``skipped_file`` are used) for the
        ``stage`` loaders (:meth:`cached_stages`), computed once per split, prefix and run."""
        trainer = datamodule.trainer
        module = trainer.lightning_module
        stages = self.cached_stages(trainer, stage)
        if stages <= 0:
            raise ValueError(f"no cached outputs are served for {stage!r} now")
        self._extractor(datamodule, module, stages)
        key = (train, stages, tuple(s.path for s in samples))
        if key not in self._datasets:
            source = MultiViewDataset(samples, datamodule.preprocessing, self.views if train else 0, datamodule.seed,
                                      failure_log=datamodule.skipped_file)
            features = self._extract(trainer, source)
            labels = torch.tensor([samples[i].label for i in features.indices], dtype=torch.long)
            self._datasets[key] = FeatureTensorDataset(features.tensor, labels, random_view=train,
                                                       index=torch.tensor(features.indices, dtype=torch.long))
        return self._datasets[key]

    def _extract(self, trainer, source: MultiViewDataset) -> Features:
        """All of ``source``'s features; under DDP by shares, gathered (see the module docstring)."""
        if trainer.world_size <= 1:
            return self.extractor.extract(source)
        mine = self.extractor.extract(source, indices=range(trainer.global_rank, len(source), trainer.world_size))
        shares: list = [None] * trainer.world_size
        torch.distributed.all_gather_object(shares, (mine.indices, mine.tensor.cpu()))
        by_index = {i: t for indices, tensor in shares for i, t in zip(indices, tensor)}
        kept = sorted(by_index)
        tensor = torch.stack([by_index[i] for i in kept]) if kept else mine.tensor[:0]
        return Features(kept, tensor)

    def __getstate__(self) -> dict:
        # DDP spawn pickles the datamodule: the module and features stay behind (rebuilt there)
        return {**self.__dict__, "extractor": None, "_extractors": {}, "_module": None, "_datasets": {}}
