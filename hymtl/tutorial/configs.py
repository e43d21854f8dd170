"""The tutorial's configs: ``conf/`` composed as every run composes it, and its output folder."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from hymtl.runtime import config_dir

#: the tutorial's folder for what it saves (curves); also ``paths.output_dir`` of its composed config
TUTORIAL_DIR = Path("outputs") / "tutorial"


def composed_config(*overrides: str) -> DictConfig:
    """``conf/`` composed as ``python -m hymtl.train <overrides>`` composes it (Hydra's compose
    API): the tutorial's data and Trainer come from the same files as every run. Safe inside
    another Hydra app or compose context (its global state is put back)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.initialize import get_gh_backup, restore_gh_from_backup

    from hymtl.cli import register_resolvers

    register_resolvers()
    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="tutorial"):
            # no Hydra run here: the run folder the config names is the tutorial's
            return compose("config", overrides=[f"paths.output_dir={TUTORIAL_DIR}", *overrides])
    finally:
        restore_gh_from_backup(backup)

