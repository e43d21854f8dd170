"""Find a learning rate for a regime: ``python -m hymtl.lr_find mode=frozen model=efficientnet_lite0``.

Composes ``conf/lr_find.yaml`` (the training config plus ``lr_find.*``), builds the data and
the module as ``hymtl.train`` would, and runs Lightning's learning-rate range test per phase of
the regime (:mod:`hymtl.tuning`: frozen and partial on cached features/activations, two_phase
for its head phase and its unfrozen phase). Prints the suggested ``mode.lr`` and the override
to paste; writes ``lr_find_<n>.png`` (loss vs ``mode.lr``) and ``lr_find.json`` in its own run
folder ``outputs/lr_find/<date>/<time>/``. Nothing is trained for good: the tuner restores the
weights after each search (the feature cache it fills is the one training reads).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hymtl.cli import hymtl_main, run_entry
from hymtl.errors import HymtlError, printable

log = logging.getLogger("hymtl.lr_find")


def find_lr(cfg: DictConfig) -> dict[str, Any]:
    """Run the range test of every phase of ``cfg``'s regime; return (and save) the results."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    from hymtl.config import check_numbers
    from hymtl.fileio import atomic_write_json
    from hymtl.runtime import configure_backends
    from hymtl.tuning import check_training_split, check_settings, paste_line, phases, range_test, save_plot

    check_numbers(cfg)
    settings = OmegaConf.to_container(cfg.lr_find, resolve=True)
    check_settings(settings)
    pl.seed_everything(cfg.seed, workers=True)
    configure_backends()
    out = Path(cfg.paths.output_dir)

    features = instantiate(cfg.feature_cache)
    datamodule = instantiate(cfg.data, features=features)
    datamodule.prepare_data()
    class_names = datamodule.class_names
    check_training_split(datamodule, settings["min_batches"])

    tests = []
    for number, phase in enumerate(phases(cfg.model.unfreeze_at_epoch), start=1):
        model_cfg = OmegaConf.merge(cfg.model, phase.model_overrides)
        module = instantiate(model_cfg, num_classes=len(class_names), class_names=class_names)
        trainer = instantiate(cfg.trainer, callbacks=[], logger=False, enable_checkpointing=False,
                              enable_progress_bar=False)
        log.info("lr_find %s: %s, %d steps from mode.lr=%g to %g", phase.name, module.hparams.backbone,
                 settings["num_training"], settings["min_lr"], settings["max_lr"])
        test = range_test(phase, module, datamodule, trainer, settings)
        names = ["head", "backbone"][: len(test.factors)]
        save_plot(test, out / f"lr_find_{number}.png", names)
        tests.append(test)
        rate = f"mode.lr={test.suggestion:.2e}" if test.suggestion is not None else "no suggestion (curve too short)"
        print(f"{phase.name}: suggested {rate}; plot {printable(test.plot)}", flush=True)

    if tests[0].suggestion is None:
        raise HymtlError(f"no learning rate suggested: the loss curve has {len(tests[0].losses)} points (the loss "
                         f"diverged at once, or lr_find.num_training is too small); see {printable(tests[0].plot)}")
    paste = paste_line(tests, float(cfg.model.backbone_lr_mult))
    result = {"mode": cfg.mode.name, "backbone": cfg.model.backbone, "paste": paste,
              "phases": [t.as_dict() for t in tests]}
    atomic_write_json(out / "lr_find.json", result)
    print(f"paste: {paste}", flush=True)
    return result


@hymtl_main("lr_find")
def main(cfg: DictConfig) -> None:
    """Hydra entry point; one ``error: ...`` line and exit code 2 on bad input."""
    run_entry(find_lr, cfg)


if __name__ == "__main__":
    main()
