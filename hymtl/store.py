"""A sharded store of tensor rows: the files behind the feature cache.

One folder holds *shards*, each a safetensors file ``<created_ns>-<pid>-<random>.safetensors``
with one tensor ``rows`` of shape ``(n, *R)`` in the store's dtype and, in the safetensors
header's metadata, the index of its rows (JSON under ``hymtl-store``): for each row its key,
its metadata (a small JSON object) and the SHA-256 of its bytes. So a folder of a million
images is a few hundred files, not a million; a row is read through a memory map without
loading its shard; and the index is the shards themselves, with no separate file to keep in
step with them.

* **Writes** are buffered (:class:`ShardWriter`) and land as whole shards, atomically
  (:func:`hymtl.fileio.atomic_write_bytes`: a temporary file, then a rename), when the
  buffer reaches ``shard_bytes``, when ``flush_seconds`` have passed since the last shard,
  and when the writer closes, also on an exception or an interrupting signal: an interrupted
  run keeps what it computed. Shard names are unique per process and time, so any number of
  processes (DDP ranks, parallel runs) write into one folder without locks; a reader never
  sees a half-written shard.
* **Reads**: :meth:`ShardedStore.refresh` reads the headers of the shards it has not seen
  (safetensors checks that the header and the tensor span the file exactly, so a truncated
  or padded shard is caught there); :meth:`ShardedStore.rows` lists the rows of a key, newest
  first (a key written again, e.g. after its row failed verification, has several);
  :meth:`ShardedStore.read` reads one row and checks its SHA-256 and dtype. Loading runs no
  code: safetensors holds raw tensors and a JSON header, nothing else.
* An unreadable shard (garbage, truncated, a foreign file, a wrong index) is logged once and
  removed, so its rows are recomputed and written again; a row that fails its checksum
  raises :class:`StoreError` and the caller recomputes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from hymtl.fileio import atomic_write_bytes, regular_file_problem

log = logging.getLogger(__name__)

STORE_FORMAT = 1  # the layout of the header's index
SUFFIX = ".safetensors"
_INDEX = "hymtl-store"  # the metadata key of the index
_TENSOR = "rows"
_MAX_ROWS = 50_000  # keeps a shard's JSON header far below safetensors' 100 MB limit


def tensor_checksum(*tensors: torch.Tensor) -> str:
    """SHA-256 over the raw bytes of ``tensors`` (with their shapes and dtypes): detects flipped bytes."""
    digest = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().cpu()
        digest.update(repr((tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class StoreError(Exception):
    """A row (or shard) that cannot be used: missing, unreadable, or failing its checksum."""


class Row(NamedTuple):
    """Where one stored row lives and what its header says about it."""

    shard: str  # file name in the store's folder
    position: int  # row index in the shard's tensor
    key: tuple
    meta: dict
    sha256: str  # of the row's bytes (:func:`tensor_checksum`)
    shape: tuple  # of the row (without the leading n)
    created_ns: int  # when its shard was written: newer rows of a key come first


def _key(key: Sequence[Any]) -> str:
    return json.dumps(list(key))  # ensure_ascii: any path, even one that is not UTF-8, round-trips


class ShardedStore:
    """Rows of ``dtype`` tensors keyed by JSON-able sequences, in safetensors shards of ``folder``.

    Args:
        folder: the shards' folder (created by the first write).
        dtype: the dtype of every row; a shard of another dtype is unreadable.
        shard_bytes: a writer writes a shard once it buffers this many bytes.
        flush_seconds: ... or once this long has passed since its last shard (``0``: a shard per
            :meth:`ShardWriter.add`); an interrupted process loses at most this much work even
            when it is killed without a chance to flush.
    """

    def __init__(self, folder: str | os.PathLike, dtype: torch.dtype, shard_bytes: int = 64 << 20,
                 flush_seconds: float = 30.0):
        self.folder = Path(folder)
        self.dtype = dtype
        self.shard_bytes = int(shard_bytes)
        self.flush_seconds = float(flush_seconds)
        self.unreadable_shards = 0  # removed by refresh(), in this process
        self._seen: set[str] = set()
        self._index: dict[str, list[Row]] = {}
        self._handles: dict[str, Any] = {}

    # ------------------------------------------------------------------ reading
    def shard_paths(self) -> list[Path]:
        """The shards in the folder now (temporaries of writes in progress start with a dot)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.name.endswith(SUFFIX) and not p.name.startswith("."))

    def refresh(self) -> None:
        """Index the shards written since the last call (by this or any other process)."""
        for path in self.shard_paths():
            if path.name in self._seen:
                continue
            problem = regular_file_problem(path)
            if problem is not None:  # a FIFO would block safe_open for good: a damaged entry, not a shard
                self._seen.add(path.name)  # warned once; left in place (not ours to remove)
                self.unreadable_shards += 1
                log.warning("cache entry %s is %s; ignored, its rows are computed again", path, problem)
                continue
            try:
                rows = self._read_header(path)
            except Exception as exc:  # noqa: BLE001 - whatever the file holds, it is not a shard to trust
                self._drop_unreadable(path, exc)
                continue
            self._seen.add(path.name)
            for row in rows:
                self._index.setdefault(_key(row.key), []).append(row)
        for rows in self._index.values():
            rows.sort(key=lambda r: (r.created_ns, r.shard, r.position), reverse=True)

    def _read_header(self, path: Path) -> list[Row]:
        with safe_open(str(path), framework="pt") as shard:
            header = shard.metadata() or {}
            if set(shard.keys()) != {_TENSOR}:
                raise StoreError(f"tensors {sorted(shard.keys())}, expected [{_TENSOR!r}]")
            shape = tuple(shard.get_slice(_TENSOR).get_shape())
        index = json.loads(header[_INDEX]) if _INDEX in header else None
        if not isinstance(index, dict) or index.get("format") != STORE_FORMAT:
            raise StoreError("no index of this store format in the header")
        entries, created = index["rows"], int(index["created_ns"])
        if not isinstance(entries, list) or len(shape) < 1 or len(entries) != shape[0]:
            raise StoreError(f"{len(entries) if isinstance(entries, list) else 'no'} index rows for a tensor of shape {shape}")
        rows = []
        for position, entry in enumerate(entries):
            key, meta, sha256 = entry
            if not (isinstance(key, list) and isinstance(meta, dict) and isinstance(sha256, str)):
                raise StoreError(f"index row {position} is malformed")
            rows.append(Row(path.name, position, tuple(key), meta, sha256, shape[1:], created))
        return rows

    def _drop_unreadable(self, path: Path, exc: Exception) -> None:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning("cache shard %s is unreadable (%s: %s); removed, its rows are computed again",
                    path, type(exc).__name__, reason)
        self.unreadable_shards += 1
        try:
            path.unlink()
        except OSError:
            self._seen.add(path.name)  # cannot remove it (read-only cache): at least warn once

    def rows(self, key: Sequence[Any]) -> list[Row]:
        """The indexed rows of ``key``, newest first (after :meth:`refresh`)."""
        return self._index.get(_key(key), [])

    def __len__(self) -> int:
        """Indexed rows, counting each stored copy of a key."""
        return sum(len(rows) for rows in self._index.values())

    def read(self, row: Row) -> torch.Tensor:
        """The tensor of ``row``, verified (dtype, shape, SHA-256); :class:`StoreError` otherwise."""
        try:
            handle = self._handles.get(row.shard)
            if handle is None:
                problem = regular_file_problem(self.folder / row.shard)
                if problem is not None:  # replaced by a FIFO or device since the refresh
                    raise StoreError(problem)
                handle = self._handles[row.shard] = safe_open(str(self.folder / row.shard), framework="pt")
            tensor = handle.get_slice(_TENSOR)[row.position: row.position + 1][0]
        except Exception as exc:  # noqa: BLE001 - a shard removed or replaced since the refresh
            raise StoreError(f"cannot read row {row.position} of {row.shard}: {exc}") from exc
        if tensor.dtype != self.dtype:
            raise StoreError(f"dtype {tensor.dtype}, expected {self.dtype}")
        if tuple(tensor.shape) != tuple(row.shape) or tensor_checksum(tensor) != row.sha256:
            raise StoreError("checksum mismatch")
        return tensor

    def close(self) -> None:
        """Release the memory maps of the shards read so far."""
        self._handles.clear()

    # ------------------------------------------------------------------ writing
    def writer(self) -> "ShardWriter":
        """A buffered writer of new rows (a context manager: it flushes on exit)."""
        return ShardWriter(self)

    def _write_shard(self, keys: list, metas: list, tensors: list[torch.Tensor]) -> None:
        created = time.time_ns()
        name = f"{created:020d}-{os.getpid()}-{secrets.token_hex(4)}{SUFFIX}"
        sha256s = [tensor_checksum(t) for t in tensors]
        index = {"format": STORE_FORMAT, "created_ns": created,
                 "rows": [[list(k), m, s] for k, m, s in zip(keys, metas, sha256s)]}
        data = safetensors_bytes({_TENSOR: torch.stack(tensors)}, metadata={_INDEX: json.dumps(index)})
        atomic_write_bytes(self.folder / name, data)
        self._seen.add(name)
        for position, (key, meta, sha256, tensor) in enumerate(zip(keys, metas, sha256s, tensors)):
            rows = self._index.setdefault(_key(key), [])
            rows.insert(0, Row(name, position, tuple(key), meta, sha256, tuple(tensor.shape), created))


class ShardWriter:
    """Buffers rows for :class:`ShardedStore` and writes them as shards (see the module docstring).

    A failed write (full disk, read-only cache) is logged once and its rows are dropped: a
    cache that cannot be written slows later runs down, it does not stop this one."""

    def __init__(self, store: ShardedStore):
        self.store = store
        self.written = 0  # rows that reached a shard
        self._keys: list = []
        self._metas: list = []
        self._tensors: list[torch.Tensor] = []
        self._bytes = 0
        self._last_flush = time.monotonic()
        self._failed = False

    def add(self, key: Sequence[Any], tensor: torch.Tensor, meta: dict | None = None) -> None:
        """Buffer one row (converted to the store's dtype); may write a shard."""
        tensor = tensor.detach().to("cpu", self.store.dtype).contiguous().clone()
        if self._tensors and tensor.shape != self._tensors[0].shape:
            self.flush()  # one row shape per shard
        self._keys.append(list(key))
        self._metas.append(dict(meta or {}))
        self._tensors.append(tensor)
        self._bytes += tensor.numel() * tensor.element_size()
        if (self._bytes >= self.store.shard_bytes or len(self._tensors) >= _MAX_ROWS
                or time.monotonic() - self._last_flush >= self.store.flush_seconds):
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one shard now."""
        keys, metas, tensors = self._keys, self._metas, self._tensors
        self._keys, self._metas, self._tensors, self._bytes = [], [], [], 0
        self._last_flush = time.monotonic()
        if not tensors:
            return
        try:
            self.store._write_shard(keys, metas, tensors)
            self.written += len(tensors)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot write to the cache %s: %s", self.store.folder, exc)
            self._failed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.flush()  # also when interrupted: what was computed is kept
