"""Run a frozen backbone (or its frozen prefix) once; the on-disk feature cache.

A frozen backbone in eval mode is a fixed function of the image, so the head can train on
its outputs instead of re-running it every epoch. The same holds for the frozen prefix of a
partially fine-tuned backbone (the stages below the ones that train): the top stages can
train on its activations (:class:`hymtl.backbones.BackbonePrefix`). :class:`FeatureExtractor` computes, for
each image of a :class:`ViewSource`, the outputs of its plain (eval-transform) view and of
``K`` augmented views, and keeps them in a persistent cache:

``<cache dir>/features/<fingerprint>/<shard>.safetensors``

* ``fingerprint`` (one folder per extractor setting): cache format, backbone name, the prefix
  (how many of its stages; all: the pooled features), a SHA-256 of every tensor of the
  prefix's state dict (weights *and* BatchNorm statistics), the stored dtype, the
  source's ``recipe`` (the exact eval and train transforms and the augmentation seed), the
  autocast dtype, the memory format and whether the network runs simplified. Any change
  selects a new folder.
* The network runs as a copy simplified for the views' size (:mod:`hymtl.simplify`: batch
  norms folded into their convolutions, timm's "same" paddings static; the same outputs up to
  rounding, checked before use): 1.5-2x faster on a CPU for lite0.
* The folder is a :class:`hymtl.store.ShardedStore`: a few large safetensors shards, each
  with the index of its rows in its header, written atomically and read through memory maps
  (a folder of a million images is a few hundred files, readable by every DDP rank at once).
  A row is one image: its ``(1 + k, *S)`` views (the plain one first), keyed by the file's
  identity, absolute path, size and ``mtime_ns`` (an edited or replaced image misses the
  cache), with the SHA-256 of the image file's bytes beside it: of the very bytes the views
  were decoded from (read once, :func:`hymtl.data.images.read_image_bytes`), never of a second
  read, so a file rewritten during extraction is recomputed next time. ``S = (F,)`` for pooled
  features (float32), ``(C, H, W)`` for the activations of a prefix (bfloat16: half the
  bytes, and the top stages train in bf16 autocast on a CPU or GPU that has it).
* A row is *verified* on every read: the SHA-256 of its bytes (flipped bits), its dtype
  and shape (the store), that every view is finite, and the SHA-256 of the image file
  (an image rewritten with the same size and mtime is caught; hashing the whole file costs
  one read of a few hundred KiB, far less than the decode it saves, and a partial hash
  would miss an edit in the middle). Augmented view ``i`` of an image is drawn with a seed
  derived from (seed, path, i), so it is the same tensor whatever ``K`` is: a row with
  ``k >= K`` views serves ``K``.
* Rows are written in shards of ``shard_mb`` (``feature_cache.shard_mb``), at least every
  ``flush_seconds`` and when the extraction ends or is interrupted (a stopped run keeps what
  it computed); the expected size of what a split adds is logged before it is written. An
  unreadable shard or an inconsistent row is logged and recomputed, never an error; a
  recomputed row goes into a new shard and, being newer, is the one read next time.

Cache location: the ``cache_dir`` argument (``feature_cache.dir`` in the config), else
``$HYMTL_CACHE_DIR``, else ``$XDG_CACHE_HOME/hymtl`` (``~/.cache/hymtl``). ``cache_dir=False``
(``feature_cache.enabled=false``) computes in memory and writes nothing.

Serving (:class:`FeatureServer`, ``feature_cache:`` in conf/), through a stated contract (the
``Protocol`` classes of "the serving contract" below): the datamodule (:class:`ServedData`) is given
the server (:class:`FeatureServing`) and asks it, for every loader, whether that stage gets
features instead of images; the server asks the LightningModule (:class:`CachedStagesModule`):
features while the backbone (or its prefix) is frozen, images from the epoch it trains (the
Trainer then reloads the dataloaders: :meth:`FeatureServer.trainer_kwargs`). Feature batches
are :class:`FeatureBatch` tuples, so the module knows it is given features, not images; the
callbacks ask the datamodule (:class:`ServesFeatures`).

Sharding (DDP): each rank runs the backbone over its own share of a split,
``range(rank, len(source), world_size)`` (reading and filling the cache entries of those
images only, on its own device), then one ``all_gather_object`` of the shares' ``(indices,
features)`` gives every rank the whole split. Each image is computed once, by one rank; the
cache is not read back, so the same protocol works with the cache disabled.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Protocol, Sequence, runtime_checkable

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from hymtl.backbones import BackbonePrefix  # noqa: F401 (re-exported: its home is the backbone's room)
from hymtl.config import checked_number
from hymtl.data.samples import Sample, TargetEncoder
from hymtl.data.images import BadImageDropper, build_transforms
from hymtl.data.loaders import SkippingDataLoader, collate_skipping
from hymtl.errors import printable
from hymtl.fileio import sha256_file
from hymtl.progress import Progress
from hymtl.simplify import Simplified, simplify_for_inference
from hymtl.store import ShardedStore, StoreError

log = logging.getLogger(__name__)

CACHE_FORMAT = 4  # bump when the row layout changes: old folders are then never read


class ViewSource(Protocol):
    """What :class:`FeatureExtractor` needs from a dataset (:class:`MultiViewDataset`).

    ``source[i]`` is ``(views, file_sha256)``: a ``(1 + num_views, 3, H, W)`` tensor (view 0 the
    plain eval view, then the augmented views, each drawn reproducibly from (seed, path, view
    index)) and the SHA-256 of the very bytes they were decoded from (read once: a file
    rewritten meanwhile cannot pair its new digest with the old content's views), or ``None``.
    """

    recipe: str  # the transforms and seed that define the views: part of the cache fingerprint
    num_views: int  # augmented views per image (K)

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str] | None: ...

    def identity(self, index: int) -> tuple[str, int, int]:
        """``(absolute path, size in bytes, mtime_ns)`` of the image file (``(origin, size, 0)``
        for bytes a source holds)."""
        ...

    def content_digest(self, index: int) -> str:
        """SHA-256 of the image's bytes (the file's, or those the source holds)."""
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
        shard_mb, flush_seconds: a cache shard is written per ``shard_mb`` of new rows, and at
            least every ``flush_seconds`` (:class:`hymtl.store.ShardedStore`).
        simplify: run a copy of ``backbone`` rewritten for the views' size
            (:func:`hymtl.simplify.simplify_for_inference`: batch norms folded, static paddings;
            the same outputs up to rounding, 1.5-2x faster on a CPU for lite0).
            ``self.simplified`` says what the last extraction changed.
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
        shard_mb: float = 64,
        flush_seconds: float = 30.0,
        simplify: bool = True,
    ):
        self.backbone = backbone
        self.simplify = bool(simplify)
        self.simplified = Simplified()
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
        self.shard_bytes = max(1, int(float(shard_mb) * 2**20))
        self.flush_seconds = float(flush_seconds)
        self._weights_digest: str | None = None
        self._stores: dict[str, ShardedStore] = {}
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
            f"simplify={self.simplify}",
        ]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]

    def store(self, recipe: str) -> ShardedStore | None:
        """The shard store of this extractor's outputs on views made by ``recipe`` (``None``
        without a disk cache)."""
        if self.cache_root is None:
            return None
        fingerprint = self.fingerprint(recipe)
        if fingerprint not in self._stores:
            self._stores[fingerprint] = ShardedStore(self.cache_root / "features" / fingerprint, self.store_dtype,
                                                     self.shard_bytes, self.flush_seconds)
        return self._stores[fingerprint]

    def _read(self, store: ShardedStore, identity: tuple[str, int, int], views: int,
              digest: Callable[[], str]) -> torch.Tensor | None:
        """The first ``views`` stored views of an image, verified, or ``None`` (missing, too few
        views, or failing a check: logged and counted as corrupt, so it is recomputed)."""
        for row in store.rows(identity):  # newest first
            if len(row.shape) < 2 or row.shape[0] < views:
                continue  # a row with fewer views than needed: not wrong, just not enough
            try:
                stored = store.read(row)
                if not torch.isfinite(stored).all():
                    raise StoreError("non-finite values")
                if row.meta.get("file_sha256") != digest():
                    raise StoreError("image file content changed")
            except (StoreError, OSError) as exc:  # never crash on a cache: recompute
                log.warning("feature cache row of %s in %s is unusable (%s); recomputing",
                            printable(identity[0]), row.shard, printable(exc))
                self.stats["corrupt"] += 1
                return None
            return stored[:views]
        return None

    def _keep(self, writer, source: ViewSource, index: int, views: torch.Tensor, file_sha256: str) -> None:
        """Hand one image's computed views to the cache writer (unless they must not be stored).

        ``file_sha256`` is the digest of the bytes the views were decoded from, never of a second
        read; the identity (size, mtime) is taken after the decode, so a file replaced meanwhile
        is stored under its new identity with the old content's digest, which the next read
        (:meth:`_read`, hashing the file as it is then) refuses and recomputes."""
        try:
            identity = source.identity(index)
        except OSError as exc:  # vanished since it was read: nothing to key the row by
            log.warning("cannot stat item %d for the feature cache: %s", index, printable(exc))
            return
        if not torch.isfinite(views).all():  # never store poison: it would be re-served every run
            log.warning("non-finite features for %s; not cached", printable(identity[0]))
            return
        writer.add(identity, views, {"file_sha256": file_sha256})

    # ------------------------------------------------------------------ extraction
    @torch.inference_mode()
    def forward(self, images: torch.Tensor, network: nn.Module | None = None) -> torch.Tensor:
        """Outputs of ``network`` (default: the backbone) for a batch, on the CPU in ``store_dtype``."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None) if dtype else contextlib.nullcontext():
            out = (network or self.backbone)(images)
        return out.to(self.store_dtype).cpu()

    def _network(self, view_shape: Sequence[int]) -> nn.Module:
        """What runs over views of ``view_shape`` (C, H, W): the backbone, or its simplified copy."""
        self.simplified = Simplified()
        if not self.simplify:
            return self.backbone
        example = torch.zeros(2, *view_shape, device=self.device)
        if self.channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        network, self.simplified = simplify_for_inference(self.backbone, example)
        return network

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

        Cached rows are read; the others are computed in batches (decoding in
        ``num_workers`` DataLoader workers) and stored. ``indices`` selects a shard. Progress:
        a bar on a terminal (images, images/s, time left, cache hits), and one summary line in
        the log at the end (count, duration, cache hits, computed): :class:`hymtl.progress.Progress`.
        """
        started = time.perf_counter()
        indices = list(range(len(source))) if indices is None else list(indices)
        views = 1 + source.num_views
        results: dict[int, torch.Tensor] = {}
        missing: list[int] = []
        store = self.store(source.recipe)
        with Progress("feature extraction", total=len(indices), unit="images", log=log) as progress:
            if store is not None:
                unreadable = store.unreadable_shards
                store.refresh()  # shards written since the last extraction, by any process
                self.stats["corrupt"] += store.unreadable_shards - unreadable
            for i in indices:
                cached = (self._read(store, source.identity(i), views, lambda i=i: source.content_digest(i))
                          if store is not None else None)
                if cached is None:
                    missing.append(i)
                else:
                    results[i] = cached
                    progress.update(1, cache_hits=len(results), computed=0)
            if len({t.shape for t in results.values()}) > 1:  # rows of foreign shapes: trust none of them
                log.warning("feature cache %s holds rows of several shapes; recomputing them all", store.folder)
                self.stats["corrupt"] += len(results)
                missing, results = list(indices), {}
            if store is not None:
                store.close()
            self.stats["hits"] += len(results)
            if missing:
                self._compute(source, missing, views, results, progress, store)
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
                 progress: Progress, store: ShardedStore | None) -> None:
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
        network = None  # built at the first batch, for its views' size
        # the writer flushes on exit, also on an interrupting signal: the rows computed so far are kept
        with self._eval_mode(), (store.writer() if store is not None else contextlib.nullcontext()) as writer:
            for positions, (batch, digests) in loader:  # items that failed to decode are dropped (None)
                n, v = batch.shape[:2]
                if network is None:
                    network = self._network(batch.shape[2:])
                feats = self.forward(batch.flatten(0, 1), network)
                feats = feats.reshape(n, v, *feats.shape[1:])
                if writer is not None and done == 0:
                    self._log_size(store, feats[0], len(missing))
                for pos, item, digest in zip(positions.tolist(), feats, digests):
                    index = missing[pos]
                    results[index] = item
                    if writer is not None:
                        self._keep(writer, source, index, item, digest)
                # the positions of a batch are increasing: up to its last, every item is done (or dropped)
                progress.update(int(positions[-1]) + 1 - done, cache_hits=hits, computed=len(results) - hits)
                done = int(positions[-1]) + 1
        progress.update(len(missing) - done)  # a last batch whose every file failed to decode
        self.stats["computed"] += sum(i in results for i in missing)

    @staticmethod
    def _log_size(store: ShardedStore, row: torch.Tensor, count: int) -> None:
        """The size the cache grows by, said before the first of it is written."""
        size = row.numel() * row.element_size() * count
        log.info("the feature cache grows by about %s for %d images (%d view%s of %s, %s each) in %s",
                 _megabytes(size), count, row.shape[0], "s" if row.shape[0] != 1 else "", "x".join(map(str, row.shape[1:])),
                 str(row.dtype).removeprefix("torch."), store.folder)


def _megabytes(size: int) -> str:
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


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
    ``augment``: the :class:`~hymtl.data.images.AugmentRecipe` of the training views (``None``:
    the default); its transforms are part of :attr:`recipe`, so of the cache fingerprint.
    """

    def __init__(self, samples: Sequence[Sample], preprocessing, num_views: int = 0, seed: int = 0,
                 failure_log: str | os.PathLike | None = None, augment=None):
        self.samples = list(samples)
        self.num_views = int(num_views)
        self.seed = int(seed)
        self.decode_size = preprocessing.resize_size
        self.eval_transform = build_transforms(preprocessing, train=False)
        self.train_transform = build_transforms(preprocessing, train=True, augment=augment)  # data.augment
        self.dropper = BadImageDropper(self.decode_size, failure_log)
        # everything that shapes the pixels of a view: the cache fingerprint of these views
        self.recipe = (f"eval={self.eval_transform!r}\ntrain={self.train_transform!r}\n"
                       f"seed={self.seed}\ndecode_size={self.decode_size}")

    def __len__(self) -> int:
        return len(self.samples)

    def identity(self, index: int) -> tuple[str, int, int]:
        sample = self.samples[index]
        if sample.data is not None:
            return sample.path, len(sample.data), 0
        return file_identity(sample.path)

    def content_digest(self, index: int) -> str:
        sample = self.samples[index]
        return hashlib.sha256(sample.data).hexdigest() if sample.data is not None else sha256_file(sample.path)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str] | None:
        sample = self.samples[index]
        key = sample.path if sample.data is not None else os.path.abspath(sample.path)
        # read once (or the bytes a source holds): the digest is of the bytes the views come from
        data = sample.data if sample.data is not None else self.dropper.read(sample.path)
        if data is None:
            return None
        views = self.dropper(sample, lambda image: self._views(image, key), data=data)
        return None if views is None else (views, hashlib.sha256(data).hexdigest())

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


# --------------------------------------------------------------------------- the serving contract
# Who talks to whom when features are served, each through one of these (nothing else is read):
#   the datamodule (ServedData)  --given-->  FeatureServing (FeatureServer)  --asks-->  the
#   module being trained (CachedStagesModule, trainer.lightning_module); the callbacks ask the
#   datamodule (ServesFeatures) and tell feature batches from image batches by FeatureBatch.
@runtime_checkable
class CachedStagesModule(Protocol):
    """What a LightningModule offers feature serving (:class:`hymtl.model.TransferModule`). A
    module without it (the tutorial's ``ClassifierModule``) is always given images."""

    #: ``hparams.backbone``: the backbone's registry name (part of the cache fingerprint);
    #: ``hparams.channels_last``: the memory format the cached prefix runs in
    hparams: Any
    #: the backbone's named stages, in order (:class:`hymtl.backbones.Stage`: ``.name``)
    backbone_stages: Sequence[Any]

    @property
    def class_names(self) -> list[str]:
        """The classes, in order: what the labels of the served rows mean."""
        ...

    def cached_stages_at(self, epoch: int | None) -> int:
        """How many leading backbone stages give the same output for an image at training epoch
        ``epoch`` (``None``: evaluating the trained model); ``0``: serve images."""
        ...

    def cached_prefix(self, stages: int) -> nn.Module:
        """The network that computes the output of the first ``stages`` stages (all of them:
        the pooled features)."""
        ...


@runtime_checkable
class ServedData(Protocol):
    """What :class:`FeatureServing` reads of the datamodule it serves
    (:class:`hymtl.data.ImageFolderDataModule`): the views are made as its image loaders make
    them, and its bad files are dropped and listed by the same rule."""

    trainer: Any  # the Trainer it is attached to: the module, device, precision and DDP ranks
    preprocessing: Any  # hymtl.backbones.Preprocessing: the images' size and normalisation
    augment: Any  # hymtl.data.images.AugmentRecipe of the training views (None: the default)
    seed: int  # the augmentation seed of the cached views
    num_workers: int  # the extraction loader's workers
    skipped_file: str | os.PathLike | None  # where a file that fails to decode is listed


@runtime_checkable
class FeatureServing(Protocol):
    """What a datamodule is given to serve features instead of images (:class:`FeatureServer`;
    ``ImageFolderDataModule(features=…)``): per loader, whether it serves now, and what."""

    def serves(self, trainer: Any, stage: str) -> bool:
        """Whether the ``stage`` ("fit", "test", "predict") loaders give cached outputs now."""
        ...

    def dataset(self, datamodule: ServedData, samples: Sequence[Sample], train: bool,
                stage: str = "fit") -> "FeatureTensorDataset":
        """The cached outputs of ``samples`` (a split of ``datamodule``) for the ``stage`` loaders."""
        ...


@runtime_checkable
class ServesFeatures(Protocol):
    """What a datamodule that may serve features offers the callbacks
    (:class:`hymtl.data.ImageFolderDataModule`): :class:`hymtl.checkpoints.GracefulStop` names the
    phase a stop happens in, :class:`hymtl.callbacks.TestFigures` decodes the few test images a
    figure shows when the test batches held features (:class:`FeatureBatch`)."""

    def serves_features(self, stage: str) -> bool:
        """Whether the ``stage`` loaders give features right now."""
        ...

    def test_images(self, positions: Sequence[int]) -> torch.Tensor:
        """The test split's images at ``positions``, prepared as for evaluation ``(n, 3, S, S)``."""
        ...


class FeatureServer:
    """Serves the outputs of a frozen backbone, or of a frozen prefix of it, computed once
    (:class:`FeatureExtractor`, with the disk cache) instead of images: ``mode=frozen`` for the
    whole run and its test, ``two_phase`` for its head-only epochs, partial fine-tuning
    (``mode=partial``) the activations below its trainable stages for every epoch and the test.
    Built from ``feature_cache:`` in conf/ and given to the datamodule
    (``ImageFolderDataModule(features=…)``), which asks it per loader.

    What it serves is decided by the module being trained, found as ``trainer.lightning_module``
    and never read from the config, through :class:`CachedStagesModule`:
    ``module.cached_stages_at(epoch)`` names how many leading stages are fixed at the epoch to
    run (``fit``) or for good (``test``: ``epoch=None``), and ``module.cached_prefix(stages)``
    the network that computes their output; ``0`` means images. Of the datamodule it reads
    :class:`ServedData`; it is the datamodule's :class:`FeatureServing`.
    The device (``trainer.strategy.root_device``) and the autocast dtype (``trainer.precision``)
    come from the Trainer, the memory format from ``hparams.channels_last``.

    Args:
        precompute: serve features at all (``mode.precompute_features``); ``False``: images always.
        views: augmented views cached per training image, beside the plain view (``mode.feature_views``).
        enabled: the disk cache; ``False`` computes in memory and writes nothing.
        dir: the cache root; ``None``: :func:`default_cache_dir`.
        batch_size: images per extraction forward pass.
        shard_mb: the size of the cache's shard files (:class:`hymtl.store.ShardedStore`).
        flush_seconds: the most extraction time whose rows wait in memory before they are
            written (a run killed without warning loses at most this much).
    """

    def __init__(self, precompute: bool = False, views: int = 0, enabled: bool = True,
                 dir: str | os.PathLike | None = None, batch_size: int = 64, shard_mb: float = 64,
                 flush_seconds: float = 30.0):
        self.precompute = bool(precompute)
        # the rules of these keys: hymtl.config.NUMBER_RULES
        self.views = checked_number("mode.feature_views", views)
        self.cache_dir: str | os.PathLike | None | bool = (dir or None) if enabled else False
        self.batch_size = checked_number("feature_cache.batch_size", batch_size)
        self.shard_mb = checked_number("feature_cache.shard_mb", shard_mb)
        self.flush_seconds = checked_number("feature_cache.flush_seconds", flush_seconds)
        self.extractor: FeatureExtractor | None = None  # the last one used (built per module and prefix)
        self._extractors: dict[int, FeatureExtractor] = {}
        self._module = None
        self._datasets: dict = {}

    def trainer_kwargs(self, module) -> dict:
        """Extra Trainer arguments: a module whose phase switches mid-fit (``has_phase_switch``:
        two-phase, the depth search) needs new dataloaders when what is served changes.

        Every epoch, not at the switch: Lightning counts that period from the epoch it last built
        the loaders, which after a resume is the resumed epoch, so a run resumed in its head-only
        phase would miss the switch (features served to a training backbone) and reload at other
        epochs than an uninterrupted run (other worker seeds). Rebuilding a loader costs little:
        the features stay in memory (:meth:`dataset`)."""
        switches = bool(getattr(module, "has_phase_switch", False))
        return {"reload_dataloaders_every_n_epochs": 1} if self.precompute and switches else {}

    def cached_stages(self, trainer, stage: str) -> int:
        """How many leading backbone stages the ``stage`` ("fit", "test", "predict") loaders serve
        the output of right now; ``0``: images."""
        if not self.precompute or trainer is None or stage not in ("fit", "test"):
            return 0
        module = getattr(trainer, "lightning_module", None)
        if not isinstance(module, CachedStagesModule):
            return 0  # a module without a backbone schedule is always given images
        return int(module.cached_stages_at(None if stage == "test" else epoch_to_run(trainer)))

    def serves(self, trainer, stage: str) -> bool:
        """Whether the ``stage`` ("fit", "test", "predict") loaders give cached outputs right now."""
        return self.cached_stages(trainer, stage) > 0

    def _extractor(self, datamodule: ServedData, module: CachedStagesModule, stages: int) -> FeatureExtractor:
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
                shard_mb=self.shard_mb,
                flush_seconds=self.flush_seconds,
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

    def dataset(self, datamodule: ServedData, samples: Sequence[Sample], train: bool,
                stage: str = "fit") -> FeatureTensorDataset:
        """The cached outputs of ``samples`` (a split of ``datamodule``: its ``trainer``,
        ``preprocessing``, ``augment``, ``seed``, ``num_workers`` and ``skipped_file`` are used) for the
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
                                      failure_log=datamodule.skipped_file, augment=datamodule.augment)
            features = self._extract(trainer, source)
            target = TargetEncoder(len(module.class_names))
            labels = [target(samples[i]) for i in features.indices]
            labels = torch.stack(labels) if labels and torch.is_tensor(labels[0]) else torch.tensor(labels, dtype=torch.long)
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
