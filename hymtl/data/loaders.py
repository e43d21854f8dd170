"""DataLoader plumbing: worker count, the batch rule for dropped images, worker start-up and end."""

from __future__ import annotations

import ctypes
import functools
import multiprocessing
import os
import signal
import sys
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
    keeps the model's steps free of special cases. Its workers never outlive the process that
    started them (:func:`_die_with_the_parent`), whatever ``worker_init_fn`` adds.
    """

    def __init__(self, *args, worker_init_fn=None, **kwargs):
        super().__init__(*args, worker_init_fn=functools.partial(start_worker, then=worker_init_fn), **kwargs)

    def __iter__(self):
        return (batch for batch in super().__iter__() if batch is not None)


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_the_parent() -> None:
    """End this worker with the process that started it, however that one ends.

    torch's worker watchdog compares ``os.getppid()`` with the parent's pid read when the worker
    loop starts; a parent killed between the fork and that read (SIGKILL, the OOM killer) leaves
    the worker with init as its "parent", idle forever and holding the parent's stdout/stderr,
    so whoever waits for the job's output waits for good. On Linux the kernel delivers SIGKILL
    when the parent dies (``PR_SET_PDEATHSIG``: strictly, when the thread that forked ends;
    hymtl iterates its loaders on the main thread); a parent already gone is checked right after."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no libc prctl (e.g. musl without the symbol): the check below
            pass
    if not parent.is_alive():
        os._exit(0)


def start_worker(worker_id: int, then=None) -> None:
    """Every hymtl DataLoader worker's first step (a ``worker_init_fn``): never outlive the
    process that started it (:func:`_die_with_the_parent`), then ``then(worker_id)``."""
    _die_with_the_parent()
    if then is not None:
        then(worker_id)


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
