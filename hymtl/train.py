"""Train, then test the best checkpoint: ``python -m hymtl.train mode=frozen model=efficientnet_lite0``.

Writes one Hydra run folder (``outputs/<date>/<time>/``, or ``outputs/multirun/…/<n>/``):
``.hydra/`` (the composed config), ``checkpoints/`` (best by val accuracy + last),
the loggers' folders (``tensorboard/`` by default; ``logger=[tensorboard,mlflow,csv]``: see
``hymtl.loggers``), ``metrics.json``; prints the test metrics, the tutorial's two lines and
where each logger put the run.
Everything here is instantiated from ``conf/``; the callbacks publish the results
(``hymtl.callbacks.RunSummary`` writes ``metrics.json`` and prints the tutorial lines).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hymtl.cli import hymtl_main, run_entry

log = logging.getLogger("hymtl.train")


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit and test one configuration; return the final metrics (also written to metrics.json)."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from hymtl import runs
    from hymtl.callbacks import RunSummary
    from hymtl.config import check_numbers, instantiate_group
    from hymtl.loggers import instantiate_loggers
    from hymtl.resume import check_resumable_classes, check_resume
    from hymtl.runtime import configure_backends
    from hymtl.signals import RunSignals

    check_numbers(cfg)
    resume = runs.resolve_resume(cfg.get("ckpt_path"), Path(cfg.paths.output_dir), Path(cfg.paths.log_dir))
    # a damaged checkpoint or other settings (data, preprocessing, regime…): refused before the
    # run folder is touched (its metrics.json, skipped.txt and .hydra/ stay the run's own)
    resumed_hparams = check_resume(resume, cfg) if resume is not None else None
    run_folder = runs.continue_run(cfg, resume)  # a resume continues in its run's folder
    # a preset whose package is missing stops here, before the scan; a tracking server is asked
    # when the first thing is sent (hymtl.loggers.mlflow)
    loggers = instantiate_loggers(cfg.get("logger"))
    pl.seed_everything(cfg.seed, workers=True)
    configure_backends()

    # SIGINT/SIGTERM stop every phase with 128+signal and a line saying what is saved
    with RunSignals(run_folder / runs.CHECKPOINTS_DIR) as signals:
        features = instantiate(cfg.feature_cache)
        datamodule = instantiate(cfg.data, features=features)
        signals.phase = "the download"
        datamodule.prepare_data()  # download if missing: the class names are needed to build the head
        signals.phase = "the file scan"
        log.info("checking the files of %s", datamodule.root)
        class_names = datamodule.class_names
        signals.phase = "the setup of the run"
        model = instantiate(cfg.model, num_classes=len(class_names), class_names=class_names,
                            class_counts=datamodule.class_counts, train_images=len(datamodule.train_samples))
        if resume is not None:
            check_resumable_classes(resume.checkpoint, resumed_hparams, model.class_names)
        log.info("classes %s; backbone %s (%s)", model.class_names, model.hparams.backbone, model.weights_source)

        trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=instantiate_group(cfg.get("callbacks")),
                                          logger=loggers, **features.trainer_kwargs(model))
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

        signals.phase = "the setup of the fit"  # hymtl.checkpoints.GracefulStop names the phases inside
        trainer.fit(model, datamodule=datamodule, ckpt_path=str(resume.checkpoint) if resume else None,
                    weights_only=True)
        signals.phase = "the end of the fit"
        if cfg.get("test"):
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            trainer.test(model, datamodule=datamodule, ckpt_path=best or None, weights_only=True)
        signals.phase = "results" if cfg.get("test") else "the end of the fit"
        # RunSummary publishes the numbers (from metrics.json where a DDP-spawn fit ran in child processes)
        summary = next((c for c in trainer.callbacks if isinstance(c, RunSummary)), None)
        return summary.result() if summary is not None else {}


def _train_and_score(cfg: DictConfig) -> float | None:
    """What Hydra sweepers (Optuna) optimise: ``cfg.optimized_metric`` of the run's metrics."""
    value = train(cfg).get(cfg.get("optimized_metric"))
    return float(value) if value is not None else None


@hymtl_main("config")
def main(cfg: DictConfig) -> float | None:
    """Hydra entry point; returns ``cfg.optimized_metric`` for sweepers."""
    return run_entry(_train_and_score, cfg)


if __name__ == "__main__":
    main()
