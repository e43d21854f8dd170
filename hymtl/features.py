"""Run a frozen backbone once; the on-disk feature cache.

A frozen backbone in eval mode is a fixed function of the image, so the head can train on
its outputs instead of re-running it every epoch. :class:`FeatureExtractor` computes, for each
image of a :class:`ViewSource`, the features of its plain (eval-transform) view and of ``K``
augmented views, and keeps them in a persistent cache:

``<cache dir>/features/<fingerprint>/<kk>/<key>.pt``

* ``fingerprint`` (one folder per extractor setting): cache format, backbone name, a SHA-256
  of every tensor of the backbone's state dict (weights *and* BatchNorm statistics), the
  source's ``recipe`` (the exact eval and train transforms and the augmentation seed), the
  autocast dtype and the memory format. Any change selects a new folder.
* ``key`` (one file per image): SHA-256 of the file's absolute path, size and ``mtime_ns``:
  an edited or replaced image misses the cache; ``kk`` is its first two hex digits.
* Each file holds ``{"identity": [path, size, mtime_ns], "plain": (F,), "aug": (k, F)}``.
  Augmented view ``i`` of an image is drawn with a seed derived from (seed, path, i), so it
  is the same tensor whatever ``K`` is: an entry with ``k >= K`` views serves ``K``.
* Files are written atomically (:func:`hymtl.fileio.atomic_write_bytes`) and read with
  ``torch.load(weights_only=True)``; an unreadable or inconsistent entry is logged and
  recomputed, never an error.

Cache location: the ``cache_dir`` argument (``feature_cache.dir`` in the config), else
``$HYMTL_CACHE_DIR``, else ``$XDG_CACHE_HOME/hymtl`` (``~/.cache/hymtl``). ``cache_dir=False``
(``feature_cache.enabled=false``) computes in memory and writes nothing.

Sharding (DDP): entries are per image and written atomically, so ranks can fill the cache
concurrently without coordination. Each rank extracts its own share, then, after a barrier,
every rank reads all entries (all hits)::

    extractor.extract(source, indices=range(rank, len(source), world_size))
    strategy.barrier()
    feats = extractor.extract(source)      # (N, 1 + K, F), read from the cache

(with the cache disabled, all-gather the per-rank tensors instead).
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
from torch.utils.data import DataLoader, Dataset, Subset

from hymtl.fileio import atomic_write_bytes

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the entry layout changes: old folders are then never read


class ViewSource(Protocol):
    """What :class:`FeatureExtractor` needs from a dataset (``hymtl.data.MultiViewDataset``).

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
    tensor: torch.Tensor  # (len(indices), 1 + num_views, F), float32


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
    return int.from_bytes(hashlib.sha256(f"{seed}|{path}|{view}".encode()).digest()[:8], "little") & (2**63 - 1)


class FeatureExtractor:
    """Runs ``backbone`` (eval mode, ``inference_mode``) over view sources, with the disk cache.

    Args:
        backbone: maps ``(N, 3, H, W)`` to ``(N, F)`` (``TransferModule.backbone``).
        name: the backbone's registry name (part of the fingerprint).
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
    ):
        self.backbone = backbone
        self.name = name
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
            f"weights={self.weights_digest}",
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
        """The ``(1 + num_views, F)`` features of an entry, or ``None`` (missing, corrupt, too few views)."""
        if not path.is_file():
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            plain, aug = entry["plain"], entry["aug"]
            if tuple(entry["identity"]) != tuple(identity):
                raise ValueError("identity mismatch")
            if plain.dim() != 1 or aug.dim() != 2 or aug.shape[1] != plain.shape[0] or not torch.isfinite(plain).all():
                raise ValueError("bad shapes or values")
        except Exception as exc:  # truncated, garbage, wrong structure: recompute, never crash
            log.warning("feature cache entry %s is unreadable (%s: %s); recomputing", path, type(exc).__name__, exc)
            self.stats["corrupt"] += 1
            return None
        if aug.shape[0] < num_views:
            return None
        return torch.cat([plain[None], aug[:num_views]]).float()

    def _write(self, path: Path, identity: tuple[str, int, int], views: torch.Tensor) -> None:
        buffer = io.BytesIO()
        torch.save({"identity": list(identity), "plain": views[0].clone(), "aug": views[1:].clone()}, buffer)
        try:
            atomic_write_bytes(path, buffer.getvalue())
        except OSError as exc:  # a read-only or full cache disk slows runs down, it does not stop them
            log.warning("cannot write feature cache entry %s: %s", path, exc)

    # ------------------------------------------------------------------ extraction
    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features of a batch, as float32 on the CPU."""
        images = images.to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None) if dtype else contextlib.nullcontext():
            out = self.backbone(images)
        return out.float().cpu()

    @contextlib.contextmanager
    def _eval_mode(self):
        was_training = self.backbone.training
        self.backbone.eval()
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        self.backbone.to(self.device)
        try:
            yield
        finally:
            self.backbone.train(was_training)

    def extract(self, source: ViewSource, indices: Iterable[int] | None = None) -> Features:
        """Features ``(n, 1 + source.num_views, F)`` of the items ``indices`` of ``source`` (default: all).

        Cached entries are read; the others are computed in batches (decoding in
        ``num_workers`` DataLoader workers) and stored. ``indices`` selects a shard.
        """
        started = time.perf_counter()
        indices = list(range(len(source))) if indices is None else list(indices)
        views = 1 + source.num_views
        results: dict[int, torch.Tensor] = {}
        missing: list[int] = []
        for i in indices:
            path = self.entry_path(source.recipe, source.identity(i))
            cached = self._read(path, source.identity(i), source.num_views) if path is not None else None
            if cached is None:
                missing.append(i)
            else:
                results[i] = cached
        self.stats["hits"] += len(results)
        if missing:
            self._compute(source, missing, views, results)
        self.stats["seconds"] += time.perf_counter() - started
        kept = [i for i in indices if i in results]
        if len(kept) < len(indices):
            log.warning("%d of %d images failed to decode and have no features", len(indices) - len(kept), len(indices))
        tensor = torch.stack([results[i] for i in kept]) if kept else torch.empty(0, views, 0)
        return Features(kept, tensor)

    def _compute(self, source: ViewSource, missing: Sequence[int], views: int, results: dict) -> None:
        # every item is (V, 3, H, W): batch whole images so a batch holds ~batch_size views
        per_batch = max(1, self.batch_size // views)
        loader = DataLoader(
            _Indexed(Subset(source, missing)), batch_size=per_batch, shuffle=False, collate_fn=_collate_decoded,
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
            # its own generator: creating the iterator draws a seed, and drawing it from the global
            # RNG would make a run that extracts differ from one that reads the cache
            generator=torch.Generator(),
        )
        with self._eval_mode():
            for positions, batch in loader:
                if batch is None:
                    continue
                n, v = batch.shape[:2]
                feats = self.forward(batch.flatten(0, 1)).view(n, v, -1)
                for pos, item in zip(positions.tolist(), feats):
                    index = missing[pos]
                    results[index] = item
                    path = self.entry_path(source.recipe, source.identity(index))
                    if path is not None:
                        self._write(path, source.identity(index), item)
        self.stats["computed"] += sum(i in results for i in missing)


def _collate_decoded(items):
    """``(positions, views)`` of the items that decoded (a source gives ``None`` for a bad file)."""
    items = [(pos, views) for pos, views in items if views is not None]
    if not items:
        return None, None
    return torch.tensor([pos for pos, _ in items]), torch.stack([views for _, views in items])


class _Indexed(Dataset):
    """``(position, item)`` pairs, so a batch knows which samples it holds."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, position: int):
        return position, self.dataset[position]
