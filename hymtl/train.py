"""Train, then test the best checkpoint: ``python -m hymtl.train mode=frozen model=efficientnet_lite0``.

Writes one Hydra run folder (``outputs/<date>/<time>/``, or ``outputs/multirun/…/<n>/``):
``.hydra/`` (the composed config), ``checkpoints/`` (best by val accuracy + last),
``tensorboard/``, ``metrics.json``; prints the test metrics and the tutorial's two lines.
Everything here is instantiated from ``conf/``; the callbacks publish the results
(``hymtl.callbacks.RunSummary`` writes ``metrics.json`` and prints the tutorial lines).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from hymtl.cli import run_entry
from hymtl.runtime import config_dir

log = logging.getLogger("hymtl.train")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test one configuration; return the final metrics (also written to metrics.json)."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from hymtl.callbacks import RunSummary
    from hymtl.config import check_numbers, instantiate_group
    from hymtl.resume import check_resumable, resolve_resume
    from hymtl.runtime import configure_backends

    check_numbers(cfg)
    resume = resolve_resume(cfg.get("ckpt_path"), Path(cfg.paths.output_dir), Path(cfg.paths.log_dir))
    if resume is not None and resume.run_dir is not None and resume.run_dir.resolve() != Path(cfg.paths.output_dir).resolve():
        # one run, one folder: the best checkpoint so far, the curves and metrics.json stay together
        log.info("resuming %s: writing to its run folder %s", resume.checkpoint, resume.run_dir)
        cfg.paths.output_dir = str(resume.run_dir)
    pl.seed_everything(cfg.seed, workers=True)
    configure_backends()

    features = instantiate(cfg.feature_cache)
    datamodule = instantiate(cfg.data, features=features)
    datamodule.prepare_data()  # download if missing: the class names are needed to build the head
    model = instantiate(cfg.model, num_classes=len(datamodule.class_names), class_names=datamodule.class_names)
    if resume is not None:
        check_resumable(resume.checkpoint, model.hparams.backbone, model.class_names, model.hparams.unfreeze_at_epoch)
    log.info("classes %s; backbone %s (%s)", model.class_names, model.hparams.backbone, model.weights_source)

    loggers = instantiate_group(cfg.get("logger"))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")), logger=loggers,
                                      **features.trainer_kwargs(model.hparams.unfreeze_at_epoch))
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume.checkpoint) if resume else None, weights_only=True)
    if cfg.get("test"):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
    # RunSummary publishes the numbers (from metrics.json where a DDP-spawn fit ran in child processes)
    summary = next((c for c in trainer.callbacks if isinstance(c, RunSummary)), None)
    return summary.result() if summary is not None else {}


def _train_and_score(cfg: DictConfig) -> float | None:
    """What Hydra sweepers (Optuna) optimise: ``cfg.optimized_metric`` of the run's metrics."""
    value = train(cfg).get(cfg.get("optimized_metric"))
    return float(value) if value is not None else None


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` for sweepers."""
    return run_entry(_train_and_score, cfg)


if __name__ == "__main__":
    main()
