"""CSV (``conf/logger/csv.yaml``, Lightning's ``CSVLogger``): ``<run>/csv/metrics.csv`` (a row per
logged step, every epoch's numbers) and ``hparams.yaml``. It keeps no images: the figures are
the PNGs of ``<run>/figures/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from hymtl.fileio import shown_path
from hymtl.loggers import Adapter, not_sent_line


class CSVAdapter(Adapter):
    kind = "csv"

    def where(self, logger: Any) -> dict[str, Any]:
        return {"metrics_csv": str(Path(logger.log_dir) / "metrics.csv")}

    def end_lines(self, where: Mapping[str, Any], run_dir: str) -> list[str]:
        return [f"csv: {shown_path(where['metrics_csv'])}" if where.get("metrics_csv") else "csv: no metrics.csv",
                *not_sent_line(self.kind, where, shown_path(run_dir))]

    def sweep_lines(self, wheres: Sequence[Mapping[str, Any]], sweep_dir: str) -> list[str]:
        files = [Path(w["metrics_csv"]) for w in wheres if w.get("metrics_csv")]
        try:  # <sweep>/*/csv/metrics.csv: the run's number is the first part below the sweep
            parts = files[0].resolve().relative_to(Path(sweep_dir).resolve()).parts
            pattern = str(Path(shown_path(sweep_dir), "*", *parts[1:]))
        except (IndexError, ValueError):
            pattern = " ".join(shown_path(f) for f in files)
        return [f"csv: {pattern} ({len(files)} runs)"] if files else []

    def finish(self, logger: Any) -> None:
        logger.save()


ADAPTER = CSVAdapter()
