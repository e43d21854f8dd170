"""Progress of a long phase outside Lightning's loops (file check, download, feature extraction,
export): on a terminal a tqdm bar with the look of Lightning's own; always one summary line in
the log when the phase ends (count, duration, the phase's own counts), so CI logs and
``train.log`` get one line per phase instead of a bar.

    with Progress("file check", total=len(paths), unit="files", log=log) as progress:
        for path in paths:
            ...
            progress.update(1, bad=bad_so_far)
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

_log = logging.getLogger(__name__)


def on_terminal() -> bool:
    """Whether progress bars are wanted: stdout is a terminal (Lightning's bar writes there too)."""
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # replaced or closed stdout
        return False


class Progress:
    """One phase's progress. ``update(n, **counts)`` advances by ``n`` and sets the phase's own
    counts (``bad=3``, ``cache_hits=120``); they show in the bar's postfix and in the summary line.
    ``unit="B"`` scales bytes (kB, MB) as a download wants. The summary is logged at ``INFO`` when
    the phase ends normally; an exception leaves only the exception's own report."""

    def __init__(self, phase: str, total: int | None = None, unit: str = "items",
                 log: logging.Logger | None = None, bar: bool | None = None) -> None:
        self.phase = phase
        self.total = total
        self.unit = unit
        self.log = log or _log
        self.done = 0
        self.counts: dict[str, Any] = {}
        self._want_bar = on_terminal() if bar is None else bar
        self._bar = None
        self._started = 0.0

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._started

    def __enter__(self) -> "Progress":
        self._started = time.perf_counter()
        if self._want_bar:
            from tqdm.auto import tqdm

            bytes_ = self.unit == "B"
            self._bar = tqdm(total=self.total, desc=self.phase, unit=self.unit, unit_scale=bytes_,
                             unit_divisor=1024 if bytes_ else 1000, leave=False, dynamic_ncols=True,
                             file=sys.stdout)
        return self

    def update(self, n: int = 1, **counts: Any) -> None:
        self.done += n
        self.counts.update(counts)
        if self._bar is not None:
            if counts:
                self._bar.set_postfix({k.replace("_", " "): v for k, v in self.counts.items()}, refresh=False)
            self._bar.update(n)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if exc_type is None:
            self.log.info("%s", self.summary())

    def summary(self) -> str:
        """``"<phase>: <done> <unit> in <s>s (<rate>/s, k v, …)"``: the line logged at the end."""
        elapsed = max(self.elapsed, 1e-9)
        if self.unit == "B":
            amount, rate = f"{self.done / 2**20:.1f} MB", f"{self.done / 2**20 / elapsed:.1f} MB/s"
        else:
            amount, rate = f"{self.done} {self.unit}", f"{self.done / elapsed:.1f} {self.unit}/s"
        extra = "".join(f", {k.replace('_', ' ')} {v}" for k, v in self.counts.items())
        return f"{self.phase}: {amount} in {elapsed:.1f}s ({rate}{extra})"
