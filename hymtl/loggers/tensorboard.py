"""TensorBoard (``conf/logger/tensorboard.yaml``, the default): images, the HParams dashboard
(columns + ``hp_metric``), the run's summary as a text card; the command that opens it."""

from __future__ import annotations

import shlex
from typing import Any, Mapping, Sequence

from hymtl.fileio import shown_path
from hymtl.loggers import Adapter, not_sent_line


class TensorBoardAdapter(Adapter):
    kind = "tensorboard"

    def hparams(self, logger: Any, columns: Mapping[str, Any], metrics: Mapping[str, float], step: int) -> None:
        # with metrics: the HParams plugin's session (the dashboard's row), not only hparams.yaml
        logger.log_hyperparams(dict(columns), metrics=dict(metrics))
        logger.experiment.flush()

    def figures(self, logger: Any, pixels: Mapping[str, Any], step: int) -> bool:
        for tag, image in pixels.items():
            logger.experiment.add_image(tag, image, global_step=step, dataformats="HWC")
        logger.experiment.flush()
        return True

    def summary(self, logger: Any, facts: Mapping[str, float], info: Mapping[str, str], step: int) -> None:
        # one text card (TensorBoard's Text tab); scalars that never change would only clutter the charts
        rows = [f"| {key} | {value:g} |" for key, value in facts.items()]
        rows += [f"| {key} | {value} |" for key, value in info.items() if value]
        logger.experiment.add_text("run/summary", "\n".join(["| | |", "|---|---|", *rows]), global_step=step)
        logger.experiment.flush()

    def where(self, logger: Any) -> dict[str, Any]:
        return {"log_dir": str(logger.log_dir), "root": str(logger.root_dir)}

    def end_lines(self, where: Mapping[str, Any], run_dir: str) -> list[str]:
        # --logdir the run folder: its tensorboard/ shows as one run, beside the others' of a sweep
        return [f"dashboard: tensorboard --logdir {shlex.quote(shown_path(run_dir))}",
                *not_sent_line(self.kind, where, shown_path(run_dir))]

    def sweep_lines(self, wheres: Sequence[Mapping[str, Any]], sweep_dir: str) -> list[str]:
        return [f"dashboard: tensorboard --logdir {shlex.quote(shown_path(sweep_dir))}"]


ADAPTER = TensorBoardAdapter()
