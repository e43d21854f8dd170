"""DataLoader plumbing: worker count, the batch rule for dropped images, worker start-up."""

from __future__ import annotations

import os
import signal
from typing import Sequence

from torch.utils.data import DataLoader, default_collate


def default_num_workers() -> int:
    """One worker per core the process may use, at most 8 (decoding JPEGs is the bottleneck)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(0, min(8, cores))


def collate_skipping(items: Sequence):
    """``default_collate`` without the ``None`` items (files that failed to decode); ``None``
    when the whole batch failed (:class:`SkippingDataLoader` then drops it)."""
    items = [item for item in items if item is not None]
    return default_collate(items) if items else None


class SkippingDataLoader(DataLoader):
    """A DataLoader that never yields a ``None`` batch (every file of it failed to decode).

    Lightning skips empty training batches itself but not evaluation ones; filtering here
    keeps the model's steps free of special cases.
    """

    def __iter__(self):
        return (batch for batch in super().__iter__() if batch is not None)


def worker_init(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT: Ctrl-C reaches the whole process group, and the main
    process finishes its batch and saves a checkpoint before stopping (workers dying first would
    end that batch in an error). Keeps Lightning's worker seeding (``seed_everything(workers=True)``),
    which a DataLoader with its own ``worker_init_fn`` would otherwise lose: a worker's torch,
    ``random`` and numpy seeds derive from (base seed, worker id, rank), the base seed being drawn
    from the main process's torch RNG when the loader's iterator is made. With workers made anew
    each epoch (``persistent_workers=False``) the augmentations of an epoch are thus a function of
    the main process's RNG state at its start, which a checkpoint holds: resume stays exact."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)
