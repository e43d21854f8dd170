"""Weights & Biases (``conf/logger/wandb.yaml``): online when the user is logged in, else offline
in the run folder (``<run>/wandb/offline-run-…``, sent later with ``wandb sync``): which of the
two is said once, at the start. W&B's own console chatter is silenced; the run's end lines say
where the run is."""

from __future__ import annotations

import logging
import netrc
import os
import shlex
from pathlib import Path
from typing import Any, Mapping, Sequence
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger

from hymtl.fileio import shown_path
from hymtl.loggers import Adapter, not_sent_line

log = logging.getLogger("hymtl.loggers.wandb")


def logged_in() -> bool:
    """Whether W&B has credentials here: ``WANDB_API_KEY``, or a ``wandb login`` entry in the
    netrc file for ``WANDB_BASE_URL`` (default ``https://api.wandb.ai``)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = os.environ.get("NETRC") or str(Path.home() / ".netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger(LightningWandbLogger):
    """Lightning's ``WandbLogger`` with ``offline=None`` meaning: online if logged in (or
    ``WANDB_MODE=online``), else offline (``WANDB_MODE=offline`` forces it). ``save_dir`` is
    the run folder, so the offline run sits with the rest of the run."""

    def __init__(self, offline: bool | None = None, save_dir: str = ".", project: str = "hymtl",
                 silent: bool = True, **kwargs: Any) -> None:
        mode = os.environ.get("WANDB_MODE", "").lower()
        if offline is None:
            offline = mode in ("offline", "dryrun") or (mode != "online" and not logged_in())
        if silent:  # its banner and sync hints: the end lines say where the run is
            os.environ.setdefault("WANDB_SILENT", "true")
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(offline=bool(offline), save_dir=save_dir, project=project, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # W&B warns that the setting is gone
            self._wandb_init.pop("anonymous", None)
        if offline:
            why = "WANDB_MODE=offline" if mode in ("offline", "dryrun") else "not logged in: `wandb login` or WANDB_API_KEY"
            log.info("wandb: offline (%s); the run is kept in %s, `wandb sync` sends it later",
                     why, shown_path(Path(save_dir) / "wandb"))
        else:
            log.info("wandb: online (logged in): project %s", project)

    @property
    def offline(self) -> bool:
        return bool(self._offline)


class WandbAdapter(Adapter):
    kind = "wandb"

    def hparams(self, logger: Any, columns: Mapping[str, Any], metrics: Mapping[str, float], step: int) -> None:
        logger.log_hyperparams(dict(columns))
        logger.experiment.summary.update(dict(metrics))

    def figures(self, logger: Any, pixels: Mapping[str, Any], step: int) -> bool:
        for tag, image in pixels.items():
            logger.log_image(key=tag, images=[image], step=step)
        return True

    def summary(self, logger: Any, facts: Mapping[str, float], info: Mapping[str, str], step: int) -> None:
        logger.experiment.summary.update({**facts, **{k: v for k, v in info.items() if v}})

    def where(self, logger: Any) -> dict[str, Any]:
        run = logger.experiment
        place = {"offline": bool(getattr(logger, "_offline", False)), "run_id": run.id, "project": logger.name,
                 "dir": str(Path(run.dir).parent)}  # run.dir is <run folder>/wandb/<run>/files
        if not place["offline"]:
            place["url"] = getattr(run, "url", None)
        return place

    def end_lines(self, where: Mapping[str, Any], run_dir: str) -> list[str]:
        folder = shown_path(where.get("dir", ""))
        if where.get("offline"):
            lines = [f"wandb: offline run {where.get('run_id')} in {folder}: wandb sync {shlex.quote(folder)}"]
        else:
            lines = [f"wandb: run {where.get('run_id')}: {where.get('url')}"]
        return lines + not_sent_line(self.kind, where, shown_path(run_dir))

    def sweep_lines(self, wheres: Sequence[Mapping[str, Any]], sweep_dir: str) -> list[str]:
        offline = [w for w in wheres if w.get("offline")]
        if not offline:
            return [f"wandb: {len(wheres)} runs in project {wheres[0].get('project')}"] if wheres else []
        folders = " ".join(shlex.quote(shown_path(w["dir"])) for w in offline if w.get("dir"))
        return [f"wandb: {len(offline)} offline runs: wandb sync {folders}"]

    def finish(self, logger: Any) -> None:
        # the run's files (history, summary) complete now, not at interpreter exit
        if logger._experiment is not None:
            logger.experiment.finish()


ADAPTER = WandbAdapter()
